#!/usr/bin/env python3
"""Streaming load on loopback: `edge-llm serve` against llama.cpp's `llama-server` (the anchor) and
llama-cpp-python's own server, same model, same slots and context.

Two scenarios: `quiet` (nothing else running) and `contended` (a busy loop pinned to one core for
the whole scenario, as when a laptop is busy with something else). In each, for every round, the
servers take turns (the order rotates each round): a server is started in its own process with a
clean environment (scripts/bench_servers.py), warmed up, loaded with C clients for each level of
--clients and each --sampling (each client streams --requests answers of exactly --max-tokens
tokens, one after another: `ignore_eos`, which both servers honour, so both decode the same number
of tokens whatever the model says), and stopped. Requests are chat completions
(`/v1/chat/completions`, the model's own template: what a chat user sends) or raw completions
(`--route completions`); `greedy` is temperature 0, `sampled` temperature 0.7 with the common
top_k 40 / top_p 0.95 / min_p 0.05 given explicitly (both servers' defaults). Reported per level:
generated tokens/s (all clients together, over the level's wall time) and time to first token
p50/p95, each the median over rounds, and the ratios to llama-server of the same scenario.

`--prefill 512,2048,8192`: prompt processing (quiet scenario only), in a server of its own per
round (-np 3, each slot holding the longest prompt): a prompt of exactly N token ids (random, so no
cache can help) sent alone, then again beside 2 streams that are generating; its time to first
token and N / TTFT, and how many events/s the 2 streams got meanwhile.

Models: any reference, or a name of the benchmark model set (bench_models.py: gemma3-270m,
qwen2.5-0.5b, llama3.2-1b, built once with random weights); `-m` may be given several times.

Threads: the baselines get `-t` (default: one per core, which is also llama-server's own default
here); edge-llm runs with its own default (every core, fewer while other programs hold cores)
unless --edge-threads N fixes it, as a user's -t does. llama-server otherwise runs with its
defaults (its prompt cache, `--cache-ram`, continuous batching, -b 2048 -ub 512).

Only 127.0.0.1 is contacted; the work is bounded by --rounds, --requests, --max-tokens and
--level-seconds.

    python scripts/bench_serving.py [-m MODEL ...] [--llama-server PATH] [--scenarios quiet,contended]
        [--sampling greedy,sampled] [--clients 1,4,8] [--prefill 512,2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import (  # noqa: E402
    TOPICS,
    ServerSpec,
    Streamed,
    edge_llm_spec,
    llama_cpp_python_spec,
    llama_server_binary,
    llama_server_spec,
    parse_checkout,
    resolve_model,
    running,
    scenario,
    scrape_metrics,
    stop_on_sigterm,
    stream_completion,
    turn_order,
)

from edge_llm.engines.cpu_threads import default_threads  # noqa: E402

ANCHOR = "llama-server"
# The targets (#27): tokens/s at least 1.0x llama-server at every level quiet and 1.5x
# contended; TTFT p95 at the highest level at most 1.0x; prefill tokens/s at least 1.0x.
TOKENS_TARGET = {"quiet": 1.0, "contended": 1.5}
TTFT_P95_TARGET = 1.0


SAMPLING = {"greedy": {"temperature": 0.0},
            "sampled": {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05}}
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Prompt token ids for --prefill: ordinary text tokens in every model of the benchmark set.
PREFILL_IDS = range(1000, 20000)
PREFILL_BESIDE = 2  # streams generating while the long prompt is read


async def one_request(client: httpx.AsyncClient, model: str, topic: str, max_tokens: int, *, route: str = "chat",
                      sampling: str = "greedy") -> Streamed:
    """One streamed answer of exactly `max_tokens` tokens (ignore_eos)."""
    text = f"Write a long, detailed story about {topic}."
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, **SAMPLING[sampling]}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text + "\n\n"
    return await stream_completion(client, ROUTES[route], body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, clients: int, requests: int, max_tokens: int, budget_s: float = 1e9, *,
               route: str = "chat", sampling: str = "greedy") -> dict:
    """`clients` users, each sending up to `requests` streams one after another; none starts a new
    one after `budget_s` (each sends at least one), which bounds a level on a crawling server."""
    # A new connection per request: servers differ in how long they keep idle connections open,
    # and a request on a connection the server is just closing fails for reasons not measured here.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def user(u: int) -> list[Streamed]:
            out: list[Streamed] = []
            for r in range(requests):
                if out and time.perf_counter() - start > budget_s:
                    break
                topic = TOPICS[(u * requests + r) % len(TOPICS)]
                out.append(await one_request(client, model, topic, max_tokens, route=route, sampling=sampling))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(u) for u in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = [r.ttft for r in results]
    tokens = sum(r.tokens for r in results)
    return {"clients": clients, "sampling": sampling, "requests": len(results), "tokens": tokens,
            "short_answers": sum(r.tokens != max_tokens for r in results), "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95)}


async def warm_up(url: str, route: str = "chat") -> None:
    """A short request: lazy model loading and first-call costs stay out of the figures."""
    await load(url, 1, 1, 8, route=route)


async def prefill(url: str, n_tokens: int, beside: int, seed: int) -> dict:
    """Time to first token of a prompt of exactly `n_tokens` random token ids (a raw completion,
    so no template adds any), alone or beside `beside` streams that are generating."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=beside + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        streaming = asyncio.Event()
        stop = asyncio.Event()
        counts = [0] * beside

        async def background(i: int) -> None:
            body = {"model": model, "prompt": f"Write a long, detailed story about {TOPICS[i]}.\n\n",
                    "max_tokens": 100_000, "ignore_eos": True, "temperature": 0, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        counts[i] += 1
                        if all(counts):
                            streaming.set()
                        if stop.is_set():
                            return

        tasks = [asyncio.ensure_future(background(i)) for i in range(beside)]
        try:
            if tasks:
                await asyncio.wait_for(streaming.wait(), 600)
            before, start = list(counts), time.perf_counter()
            prompt = [rng.choice(PREFILL_IDS) for _ in range(n_tokens)]
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
            result = await stream_completion(client, "/v1/completions", body)
            seconds = time.perf_counter() - start
            beside_events = sum(counts) - sum(before)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"prompt_tokens": n_tokens, "beside": beside, "ttft": result.ttft,
            "prefill_tokens_per_s": n_tokens / result.ttft,
            "beside_events_per_s": beside_events / seconds if beside else None}


def fewer_thread_decodes(url: str) -> float | None:
    """edge-llm's count of decodes run with fewer threads than cores (its thread governor yielding
    to other programs), from /metrics; None for servers that do not report it."""
    samples = scrape_metrics(url)
    return next((v for k, v in samples.items() if k.startswith("edge_llm:decodes_with_fewer_threads")), None)


def measure(spec: ServerSpec, levels: list[int], requests: int, max_tokens: int, budget_s: float, *,
            route: str = "chat", samplings: tuple[str, ...] = ("greedy",)) -> list[dict]:
    rows = []
    with running(spec) as server:
        asyncio.run(warm_up(server.url, route))
        for sampling, clients in [(s, c) for s in samplings for c in levels]:
            cpu0 = server.cpu_seconds()
            fewer0 = fewer_thread_decodes(server.url)
            row = asyncio.run(load(server.url, clients, requests, max_tokens, budget_s, route=route,
                                   sampling=sampling))
            cpu = server.cpu_seconds() - cpu0
            row["server_cpu_cores"] = cpu / row["wall_s"]
            # CPU time per generated token: with -t 1 on both sides (no threads spinning at barriers)
            # the cost of each server's work, steadier than tokens/s on a machine shared with others.
            row["cpu_ms_per_token"] = 1000 * cpu / max(row["tokens"], 1)
            fewer1 = fewer_thread_decodes(server.url)
            if fewer0 is not None and fewer1 is not None:
                row["decodes_with_fewer_threads"] = fewer1 - fewer0
            rows.append(row)
        # What the server burns right after the work ends (threads spinning while they wait).
        cpu0 = server.cpu_seconds()
        time.sleep(1.0)
        idle = server.cpu_seconds() - cpu0
    for row in rows:
        row["idle_cpu_cores_after"] = idle
    return rows


def _key(r: dict) -> tuple:
    return r["model"], r["scenario"], r.get("sampling", "greedy"), r["clients"], r["server"]


def summarize(raw: list[dict]) -> list[dict]:
    """Median over rounds of each (model, scenario, sampling, clients, server), with ratios to the
    anchor of the same case."""
    keys = []
    for r in raw:
        if "clients" in r and _key(r) not in keys:
            keys.append(_key(r))
    keys.sort(key=lambda k: (k[0], k[1] != "quiet", k[2], k[3]))
    rows = []
    for model, scen, sampling, clients, server in keys:
        runs = [r for r in raw if "clients" in r and _key(r) == (model, scen, sampling, clients, server)]
        row = {"model": model, "scenario": scen, "sampling": sampling, "server": server, "clients": clients,
               "rounds": len(runs)}
        for field in ("tokens_per_s", "ttft_p50", "ttft_p95", "server_cpu_cores", "cpu_ms_per_token",
                      "idle_cpu_cores_after"):
            row[field] = statistics.median(r[field] for r in runs)
        row["tokens_per_s_rounds"] = [round(r["tokens_per_s"], 1) for r in runs]
        rows.append(row)
    for row in rows:
        anchor = next((a for a in rows if a["server"] == ANCHOR and _key(a)[:4] == _key(row)[:4]), None)
        if anchor:
            row["tokens_ratio"] = row["tokens_per_s"] / anchor["tokens_per_s"]
            row["ttft_p95_ratio"] = row["ttft_p95"] / anchor["ttft_p95"]
            row["cpu_ratio"] = row["cpu_ms_per_token"] / anchor["cpu_ms_per_token"]
    return rows


def summarize_prefill(raw: list[dict]) -> list[dict]:
    """Median over rounds of each (model, prompt size, alone or beside streams, server)."""
    keys = []
    for r in raw:
        key = (r["model"], r["scenario"], r["prompt_tokens"], r["beside"], r["server"])
        if "prompt_tokens" in r and key not in keys:
            keys.append(key)
    rows = []
    for model, scen, n, beside, server in keys:
        runs = [r for r in raw if "prompt_tokens" in r
                and (r["model"], r["scenario"], r["prompt_tokens"], r["beside"], r["server"]) == (model, scen, n, beside, server)]
        row = {"model": model, "scenario": scen, "prompt_tokens": n, "beside": beside, "server": server,
               "rounds": len(runs), "ttft": statistics.median(r["ttft"] for r in runs),
               "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in runs)}
        if beside:
            row["beside_events_per_s"] = statistics.median(r["beside_events_per_s"] for r in runs)
        rows.append(row)
    for row in rows:
        anchor = next((a for a in rows if a["server"] == ANCHOR and (a["model"], a["scenario"], a["prompt_tokens"],
                                                                       a["beside"]) == (row["model"], row["scenario"],
                                                                                        row["prompt_tokens"], row["beside"])), None)
        if anchor:
            row["prefill_ratio"] = row["prefill_tokens_per_s"] / anchor["prefill_tokens_per_s"]
    return rows


def targets(rows: list[dict], server: str) -> list[dict]:
    """The issue's targets for `server`, for every (model, sampling) case that ran."""
    out = []
    for row in rows:
        if row["server"] != server or "tokens_ratio" not in row:
            continue
        min_tokens = TOKENS_TARGET[row["scenario"]]
        highest = max(r["clients"] for r in rows if _key(r)[:3] == _key(row)[:3])
        max_ttft = TTFT_P95_TARGET if row["scenario"] == "quiet" and row["clients"] == highest > 1 else None
        met = row["tokens_ratio"] >= min_tokens and (max_ttft is None or row["ttft_p95_ratio"] <= max_ttft)
        out.append({"model": row["model"], "scenario": row["scenario"], "sampling": row["sampling"],
                    "clients": row["clients"], "tokens_ratio": round(row["tokens_ratio"], 3),
                    "min_tokens_ratio": min_tokens, "ttft_p95_ratio": round(row["ttft_p95_ratio"], 3),
                    "max_ttft_p95_ratio": max_ttft, "met": met})
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """'NAME:K=V,K=V' or 'NAME:K=V:--flag value' -> an extra edge-llm server with that environment."""
    name, _, rest = text.partition(":")
    env_text, _, args = rest.partition(":")
    env = dict(item.split("=", 1) for item in env_text.split(",") if item)
    return name, env, tuple(args.split())


def server_specs(args: argparse.Namespace, model: Path, *, parallel: int, ctx: int) -> list[ServerSpec]:
    """The servers of a run, each on `model` with `parallel` slots over `ctx` tokens."""
    wanted = set(args.servers.split(","))
    edge_threads = args.edge_threads
    specs: list[ServerSpec] = []
    if "edge-llm" in wanted:
        specs.append(edge_llm_spec(model, parallel=parallel, ctx=ctx, threads=edge_threads))
    for text in args.variant:
        name, env, extra = parse_variant(text)
        specs.append(edge_llm_spec(model, parallel=parallel, ctx=ctx, threads=edge_threads, name=name, env=env,
                                   extra_args=extra))
    for text in args.checkout:
        name, path, extra = parse_checkout(text)
        specs.append(edge_llm_spec(model, parallel=parallel, ctx=ctx, threads=edge_threads, name=name,
                                   extra_args=extra, checkout=path))
    if "llama-server" in wanted:
        specs.append(llama_server_spec(llama_server_binary(args.llama_server), model, parallel=parallel, ctx=ctx,
                                       threads=args.threads))
    if "llama-cpp-python" in wanted and not args.prefill_only:
        specs.append(llama_cpp_python_spec(model, ctx=ctx // parallel, threads=args.threads))
    return specs


def measure_prefill(spec: ServerSpec, sizes: list[int], seed: int) -> list[dict]:
    rows = []
    with running(spec) as server:
        asyncio.run(warm_up(server.url, "completions"))
        for n in sizes:
            for beside in (0, PREFILL_BESIDE):
                rows.append(asyncio.run(prefill(server.url, n, beside, seed=seed * 1000 + n + beside)))
    return rows


def print_tables(rows: list[dict], prefill_rows: list[dict], args: argparse.Namespace) -> None:
    print(f"-np {args.parallel} -c {args.ctx_size}, baselines -t {args.threads}, edge-llm "
          f"{f'-t {args.edge_threads}' if args.edge_threads else 'default threads'}, {args.route}, "
          f"{args.max_tokens}-token streams (ignore_eos), {args.requests} per client, median of {args.rounds} rounds")
    if rows:
        print("| model | scenario | sampling | clients | server | tokens/s | x llama-server | TTFT p50 (s) | "
              "TTFT p95 (s) | p95 x llama-server | server CPU (cores) | CPU ms/token (x llama-server) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_ratio']:.2f}" if "tokens_ratio" in r else "-"
        p95_ratio = f"{r['ttft_p95_ratio']:.2f}" if "ttft_p95_ratio" in r else "-"
        cpu_ratio = f" ({r['cpu_ratio']:.2f})" if "cpu_ratio" in r else ""
        print(f"| {r['model']} | {r['scenario']} | {r['sampling']} | {r['clients']} | {r['server']} | "
              f"{r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {p95_ratio} | "
              f"{r['server_cpu_cores']:.2f} | {r['cpu_ms_per_token']:.1f}{cpu_ratio} |")
    if prefill_rows:
        print(f"prefill: a prompt of N random token ids, alone and beside {PREFILL_BESIDE} generating streams")
        print("| model | scenario | prompt tokens | beside | server | TTFT (s) | prompt tokens/s | x llama-server | "
              "beside streams' events/s |")
        print("|---|---|---|---|---|---|---|---|---|")
    for r in prefill_rows:
        ratio = f"{r['prefill_ratio']:.2f}" if "prefill_ratio" in r else "-"
        beside = f"{r['beside_events_per_s']:.1f}" if r.get("beside_events_per_s") is not None else "-"
        print(f"| {r['model']} | {r['scenario']} | {r['prompt_tokens']} | {r['beside']} | {r['server']} | "
              f"{r['ttft']:.2f} | {r['prefill_tokens_per_s']:.1f} | {ratio} | {beside} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", action="append", default=None,
                        help="a .gguf, a model reference or a benchmark model name; repeatable (default: the demo model)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built once, cached)")
    parser.add_argument("--scenarios", default="quiet,contended")
    parser.add_argument("--clients", default="1,8", help="concurrency levels")
    parser.add_argument("--sampling", default="greedy", help="greedy, sampled or both (comma-separated)")
    parser.add_argument("--route", default="chat", choices=list(ROUTES), help="chat completions or raw completions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--level-seconds", type=float, default=45.0,
                        help="no client starts a new request after this long into a level")
    parser.add_argument("--prefill", default="", help="prompt sizes to time prompt processing on, e.g. 512,2048,8192")
    parser.add_argument("--prefill-only", action="store_true", help="only the --prefill part")
    parser.add_argument("-np", "--parallel", type=int, default=8)
    parser.add_argument("-c", "--ctx-size", type=int, default=8192)
    parser.add_argument("-t", "--threads", type=int, default=default_threads(),
                        help="threads of the baselines (default: one per core)")
    parser.add_argument("--servers", default="edge-llm,llama-server,llama-cpp-python",
                        help="which of edge-llm, llama-server, llama-cpp-python to run")
    parser.add_argument("--edge-threads", type=int, default=None,
                        help="give edge-llm this -t (default: none, edge-llm's own choice)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...[:ARGS]",
                        help="also run edge-llm under this name with these environment variables / flags")
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH[:ARGS]",
                        help="also run edge-llm from another checkout (e.g. a git worktree of an older commit), "
                             "with these flags")
    parser.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()

    stop_on_sigterm()
    models = {ref or "smollm2-135m": resolve_model(ref) for ref in (args.model or [None])}
    levels = [int(c) for c in args.clients.split(",")]
    samplings = tuple(args.sampling.split(","))
    for sampling in samplings:
        if sampling not in SAMPLING:
            raise SystemExit(f"--sampling {sampling!r}: greedy or sampled")
    sizes = [int(n) for n in args.prefill.split(",") if n]

    raw, prefill_raw = [], []
    for scen in args.scenarios.split(","):
        with scenario(scen):
            for name, model in models.items():
                specs = server_specs(args, model, parallel=args.parallel, ctx=args.ctx_size)
                prefill_specs = server_specs(args, model, parallel=PREFILL_BESIDE + 1,
                                             ctx=(PREFILL_BESIDE + 1) * (max(sizes, default=0) + 512))
                for rnd in range(args.rounds):
                    for spec in turn_order(specs, rnd) if not args.prefill_only else []:
                        for row in measure(spec, levels, args.requests, args.max_tokens, args.level_seconds,
                                           route=args.route, samplings=samplings):
                            row.update(model=name, scenario=scen, server=spec.name, round=rnd)
                            raw.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                    for spec in turn_order(prefill_specs, rnd) if sizes and scen == "quiet" else []:
                        for row in measure_prefill(spec, sizes, seed=rnd):
                            row.update(model=name, scenario=scen, server=spec.name, round=rnd)
                            prefill_raw.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)

    rows, prefill_rows = summarize(raw), summarize_prefill(prefill_raw)
    print_tables(rows, prefill_rows, args)
    names = sorted({r["server"] for r in rows} - {ANCHOR})
    verdicts = {name: targets(rows, name) for name in names}
    for name, items in verdicts.items():
        for t in items:
            limit = f", TTFT p95 {t['ttft_p95_ratio']:.2f}x (<= {t['max_ttft_p95_ratio']})" if t["max_ttft_p95_ratio"] else ""
            print(f"target {name} {t['model']} {t['scenario']} {t['sampling']} {t['clients']} client(s): "
                  f"{t['tokens_ratio']:.2f}x tokens/s (>= {t['min_tokens_ratio']}){limit}: "
                  f"{'met' if t['met'] else 'MISSED'}")
    for r in prefill_rows:
        if r["server"] != ANCHOR and "prefill_ratio" in r:
            print(f"target {r['server']} {r['model']} prefill {r['prompt_tokens']} "
                  f"{'beside streams' if r['beside'] else 'alone'}: {r['prefill_ratio']:.2f}x (>= 1.0): "
                  f"{'met' if r['prefill_ratio'] >= 1.0 else 'MISSED'}")
    result = {"bench": "serving", "models": {k: str(v) for k, v in models.items()}, "parallel": args.parallel,
              "ctx": args.ctx_size, "threads": args.threads, "edge_threads": args.edge_threads, "route": args.route,
              "max_tokens": args.max_tokens, "requests": args.requests, "rounds": args.rounds, "rows": rows,
              "prefill": prefill_rows, "targets": verdicts, "raw": raw, "prefill_raw": prefill_raw}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
