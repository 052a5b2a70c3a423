#!/usr/bin/env python3
"""Single-stream decode speed: edge-llm's engine vs llama-cpp-python's `Llama`, same settings.

Both load the same GGUF with the same context, threads and flash-attention setting, and run
greedy decoding of the same prompt for the same number of tokens. Runs alternate (edge, Llama,
edge, Llama, ...) so machine noise hits both alike; the result is the ratio of median rates.

    python scripts/bench_engine_overhead.py [-m MODEL.gguf] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from edge_llm.api import load
from edge_llm.engines.llamacpp import default_threads
from edge_llm.registry import load_registry, resolve
from edge_llm.sampling import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def rate(timestamps: list[float]) -> float:
    """Decode tokens/s: tokens after the first over the time after the first (prompt excluded)."""
    return (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])


def run_edge(engine, n: int) -> float:
    stamps = []
    params = SamplingParams.create(temperature=0, max_tokens=n, ignore_eos=True)
    for delta in engine.stream(PROMPT, params):
        stamps.extend(time.perf_counter() for _ in delta.token_ids)
    assert len(stamps) == n, len(stamps)
    return rate(stamps)


def run_llama(llm, n: int) -> float:
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()  # no prefix reuse: edge-llm's run above re-evaluates nothing either way
    stamps = []
    for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return rate(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("-np", "--parallel", type=int, default=1, help="edge-llm slots (Llama has one)")
    args = parser.parse_args()

    from llama_cpp import Llama

    path = str(resolve(args.model, load_registry()).path)
    threads = default_threads()
    engine = load(path, n_ctx=args.ctx_size * args.parallel, n_parallel=args.parallel, n_threads=threads,
                  flash_attn="on")
    llm = Llama(path, n_ctx=args.ctx_size, n_threads=threads, n_threads_batch=threads, flash_attn=True,
                verbose=False)
    run_edge(engine, 8), run_llama(llm, 8)  # warm up both
    edge, base = [], []
    for _ in range(args.rounds):
        edge.append(run_edge(engine, args.tokens))
        base.append(run_llama(llm, args.tokens))
    ratio = statistics.median(edge) / statistics.median(base)
    print(f"| engine | decode tokens/s (median of {args.rounds}) |")
    print("|---|---|")
    print(f"| llama-cpp-python Llama | {statistics.median(base):.1f} |")
    print(f"| edge-llm (-np {args.parallel}) | {statistics.median(edge):.1f} |")
    print(f"ratio edge-llm / Llama = {ratio:.3f}")
    print(json.dumps({"bench": "engine_overhead", "model": path, "tokens": args.tokens, "threads": threads,
                      "edge_tps": edge, "llama_tps": base, "ratio": round(ratio, 4)}))
    engine.close()


if __name__ == "__main__":
    main()
