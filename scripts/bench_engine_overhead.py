#!/usr/bin/env python3
"""Single-stream decode speed: edge-llm's engine vs llama-cpp-python's `Llama`, same settings.

Each measurement is a fresh process with a clean environment (scripts/bench_servers.py): the
edge-llm side runs under whatever edge-llm sets up for itself (threads, OpenMP waiting), the
`Llama` side exactly as a user's script would, and nothing one side sets can reach the other.
Both load the same GGUF with the same context, threads and flash-attention setting and decode
the same prompt greedily for the same number of tokens; sides alternate (edge, Llama, Llama,
edge, ...), the result is the ratio of median decode rates. `--scenario contended` keeps a busy
loop on one core for the whole run. `Llama` gets -t (default: one thread per core; its own
default is half the cores); edge-llm its own default unless --edge-threads fixes it.

    python scripts/bench_engine_overhead.py [-m MODEL.gguf] [--tokens 128] [--rounds 5] [--scenario quiet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, clean_env, resolve_model, scenario, stop_on_sigterm  # noqa: E402

from edge_llm.engines.cpu_threads import default_threads  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
# A measurement stops here even if not all tokens came (a setting that crawls under contention).
DEADLINE_S = 20.0


def rate(timestamps: list[float]) -> float:
    """Decode tokens/s: tokens after the first over the time after the first (prompt excluded)."""
    return (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])


def run_edge(model: str, n: int, ctx: int, threads: int | None) -> float:
    from edge_llm.api import load
    from edge_llm.sampling import SamplingParams

    engine = load(model, n_ctx=ctx, n_parallel=1, n_threads=threads, flash_attn="on")
    try:
        warm = SamplingParams.create(temperature=0, max_tokens=8, ignore_eos=True)
        list(engine.stream(PROMPT, warm))
        stamps: list[float] = []
        params = SamplingParams.create(temperature=0, max_tokens=n, ignore_eos=True)
        stream = engine.stream(PROMPT, params)
        for delta in stream:
            stamps.extend(time.perf_counter() for _ in delta.token_ids)
            if stamps[-1] - stamps[0] > DEADLINE_S:
                stream.close()
                break
        return rate(stamps)
    finally:
        engine.close()


def run_llama(model: str, n: int, ctx: int, threads: int | None) -> float:
    from llama_cpp import Llama

    kwargs = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    llm = Llama(model, n_ctx=ctx, flash_attn=True, verbose=False, **kwargs)
    tokens = llm.tokenize(PROMPT.encode())
    stamps: list[float] = []
    for limit in (8, n):  # a warm-up run, then the measured one
        llm.reset()
        stamps = []
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == limit or stamps[-1] - stamps[0] > DEADLINE_S:
                break
    return rate(stamps)


def measure(side: str, args: argparse.Namespace, model: Path, env: dict[str, str]) -> float:
    """One measurement in a fresh process with a clean environment (plus `env`, a setting under test)."""
    threads = args.threads if side == "llama" else args.edge_threads
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "-m", str(model), "--tokens",
           str(args.tokens), "-c", str(args.ctx_size), *(["-t", str(threads)] if threads else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(env), cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, env_text = text.partition(":")
    return name, dict(item.split("=", 1) for item in env_text.split(",") if item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("-t", "--threads", type=int, default=default_threads(),
                        help="threads of `Llama` (default: one per usable core)")
    parser.add_argument("--edge-threads", type=int, default=None,
                        help="give edge-llm this -t (default: none, edge-llm's own choice)")
    parser.add_argument("--scenario", default="quiet", choices=["quiet", "contended"])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...",
                        help="also measure edge-llm under this name with these environment variables")
    parser.add_argument("--worker", choices=["edge", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run = run_edge if args.worker == "edge" else run_llama
        print(run(args.model, args.tokens, args.ctx_size, args.threads))
        return

    stop_on_sigterm()
    model = resolve_model(args.model)
    sides = [("edge-llm", "edge", {}), ("llama-cpp-python Llama", "llama", {})]
    sides += [(name, "edge", env) for name, env in map(parse_variant, args.variant)]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    with scenario(args.scenario):
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for name, side, env in order:
                rates[name].append(measure(side, args, model, env))
                print(f"round {rnd}: {name} {rates[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    base = statistics.median(rates["llama-cpp-python Llama"])
    print(f"{args.scenario}, Llama -t {args.threads}, edge-llm {f'-t {args.edge_threads}' if args.edge_threads else 'default threads'}, "
          f"{args.tokens} tokens, median of {args.rounds}")
    print("| engine | decode tokens/s | x Llama |")
    print("|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.3f} |")
    ratio = statistics.median(rates["edge-llm"]) / base
    print(json.dumps({"bench": "engine_overhead", "model": str(model), "scenario": args.scenario,
                      "tokens": args.tokens, "threads": args.threads, "edge_threads": args.edge_threads, "rates": rates, "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
