#!/usr/bin/env python3
"""Streaming load on loopback: `edge-llm serve` against llama.cpp's `llama-server` (the anchor) and
llama-cpp-python's own server, same model, same slots and context.

Two scenarios: `quiet` (nothing else running) and `contended` (a busy loop pinned to one core for
the whole scenario, as when a laptop is busy with something else). In each, for every round, the
servers take turns (the order rotates each round): a server is started in its own process with a
clean environment (scripts/bench_servers.py), warmed up, loaded with C clients for each level of
--clients (each client streams --requests greedy completions of --max-tokens tokens, one after
another), and stopped. Reported per level: generated tokens/s (all clients together, over the
level's wall time) and time to first token p50/p95, each the median over rounds, and the ratios
to llama-server of the same scenario. A table, then one JSON line.

Threads: the baselines get `-t` (default: one per core, which is also llama-server's own default
here); edge-llm runs with its own default (every core, fewer while other programs hold cores)
unless --edge-threads N fixes it, as a user's -t does.

Only 127.0.0.1 is contacted; the work is bounded by --rounds, --requests, --max-tokens and
--level-seconds.

    python scripts/bench_serving.py [--llama-server PATH] [--scenarios quiet,contended] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
# The targets: (scenario, clients) -> minimum tokens/s ratio to llama-server, and the
# largest TTFT p95 ratio where one applies.
TARGETS = {("quiet", 1): (0.97, None), ("quiet", 8): (1.0, 1.5), ("contended", 1): (1.5, None),
           ("contended", 8): (1.5, None)}


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Streamed:
    """One greedy streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return await stream_completion(client, "/v1/completions", body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, clients: int, requests: int, max_tokens: int, budget_s: float = 1e9) -> dict:
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
                out.append(await one_request(client, model, f"Write a long, detailed story about {topic}.\n\n",
                                             max_tokens))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(u) for u in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = [r.ttft for r in results]
    tokens = sum(r.tokens for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95)}


async def warm_up(url: str) -> None:
    """A short request: lazy model loading and first-call costs stay out of the figures."""
    await load(url, 1, 1, 8)


def fewer_thread_decodes(url: str) -> float | None:
    """edge-llm's count of decodes run with fewer threads than cores (its thread governor yielding
    to other programs), from /metrics; None for servers that do not report it."""
    samples = scrape_metrics(url)
    return next((v for k, v in samples.items() if k.startswith("edge_llm:decodes_with_fewer_threads")), None)


def measure(spec: ServerSpec, levels: list[int], requests: int, max_tokens: int, budget_s: float) -> list[dict]:
    rows = []
    with running(spec) as server:
        asyncio.run(warm_up(server.url))
        for clients in levels:
            cpu0 = server.cpu_seconds()
            fewer0 = fewer_thread_decodes(server.url)
            row = asyncio.run(load(server.url, clients, requests, max_tokens, budget_s))
            row["server_cpu_cores"] = (server.cpu_seconds() - cpu0) / row["wall_s"]
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


def summarize(raw: list[dict]) -> list[dict]:
    """Median over rounds of each (scenario, server, clients), with ratios to the anchor."""
    keys = sorted({(r["scenario"], r["server"], r["clients"]) for r in raw}, key=lambda k: (k[0] != "quiet", k[2]))
    rows = []
    for scen, server, clients in keys:
        runs = [r for r in raw if (r["scenario"], r["server"], r["clients"]) == (scen, server, clients)]
        row = {"scenario": scen, "server": server, "clients": clients, "rounds": len(runs)}
        for field in ("tokens_per_s", "ttft_p50", "ttft_p95", "server_cpu_cores", "idle_cpu_cores_after"):
            row[field] = statistics.median(r[field] for r in runs)
        rows.append(row)
    for row in rows:
        anchor = next((a for a in rows if a["server"] == ANCHOR and a["scenario"] == row["scenario"]
                       and a["clients"] == row["clients"]), None)
        if anchor:
            row["tokens_ratio"] = row["tokens_per_s"] / anchor["tokens_per_s"]
            row["ttft_p95_ratio"] = row["ttft_p95"] / anchor["ttft_p95"]
    return rows


def targets(rows: list[dict], server: str) -> list[dict]:
    out = []
    for (scen, clients), (min_tokens, max_ttft) in TARGETS.items():
        row = next((r for r in rows if (r["scenario"], r["server"], r["clients"]) == (scen, server, clients)), None)
        if row is None or "tokens_ratio" not in row:
            continue
        met = row["tokens_ratio"] >= min_tokens and (max_ttft is None or row["ttft_p95_ratio"] <= max_ttft)
        out.append({"scenario": scen, "clients": clients, "tokens_ratio": round(row["tokens_ratio"], 3),
                    "min_tokens_ratio": min_tokens, "ttft_p95_ratio": round(row["ttft_p95_ratio"], 3),
                    "max_ttft_p95_ratio": max_ttft, "met": met})
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """'NAME:K=V,K=V' or 'NAME:K=V:--flag value' -> an extra edge-llm server with that environment."""
    name, _, rest = text.partition(":")
    env_text, _, args = rest.partition(":")
    env = dict(item.split("=", 1) for item in env_text.split(",") if item)
    return name, env, tuple(args.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="a .gguf or model reference (default: the demo model)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built once, cached)")
    parser.add_argument("--scenarios", default="quiet,contended")
    parser.add_argument("--clients", default="1,8", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--level-seconds", type=float, default=45.0,
                        help="no client starts a new request after this long into a level")
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
    args = parser.parse_args()

    stop_on_sigterm()
    model = resolve_model(args.model)
    wanted = set(args.servers.split(","))
    edge_threads = args.edge_threads
    specs: list[ServerSpec] = []
    if "edge-llm" in wanted:
        specs.append(edge_llm_spec(model, parallel=args.parallel, ctx=args.ctx_size, threads=edge_threads))
    for text in args.variant:
        name, env, extra = parse_variant(text)
        specs.append(edge_llm_spec(model, parallel=args.parallel, ctx=args.ctx_size, threads=edge_threads,
                                   name=name, env=env, extra_args=extra))
    for text in args.checkout:
        name, path, extra = parse_checkout(text)
        specs.append(edge_llm_spec(model, parallel=args.parallel, ctx=args.ctx_size, threads=edge_threads,
                                   name=name, extra_args=extra, checkout=path))
    if "llama-server" in wanted:
        specs.append(llama_server_spec(llama_server_binary(args.llama_server), model, parallel=args.parallel,
                                       ctx=args.ctx_size, threads=args.threads))
    if "llama-cpp-python" in wanted:
        specs.append(llama_cpp_python_spec(model, ctx=args.ctx_size // args.parallel, threads=args.threads))
    levels = [int(c) for c in args.clients.split(",")]

    raw = []
    for scen in args.scenarios.split(","):
        with scenario(scen):
            for rnd in range(args.rounds):
                for spec in turn_order(specs, rnd):
                    for row in measure(spec, levels, args.requests, args.max_tokens, args.level_seconds):
                        row.update(scenario=scen, server=spec.name, round=rnd)
                        raw.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)

    rows = summarize(raw)
    print(f"model {model.name}, -np {args.parallel} -c {args.ctx_size}, baselines -t {args.threads}, edge-llm "
          f"{f'-t {edge_threads}' if edge_threads else 'default threads'}, greedy, "
          f"{args.max_tokens}-token streams, {args.requests} per client, median of {args.rounds} rounds")
    print("| scenario | clients | server | tokens/s | x llama-server | TTFT p50 (s) | TTFT p95 (s) | "
          "p95 x llama-server | server CPU (cores) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_ratio']:.2f}" if "tokens_ratio" in r else "-"
        p95_ratio = f"{r['ttft_p95_ratio']:.2f}" if "ttft_p95_ratio" in r else "-"
        print(f"| {r['scenario']} | {r['clients']} | {r['server']} | {r['tokens_per_s']:.1f} | {ratio} | "
              f"{r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {p95_ratio} | {r['server_cpu_cores']:.2f} |")
    verdicts = {spec.name: targets(rows, spec.name) for spec in specs if spec.name != ANCHOR}
    for name, items in verdicts.items():
        for t in items:
            limit = f", TTFT p95 {t['ttft_p95_ratio']:.2f}x (<= {t['max_ttft_p95_ratio']})" if t["max_ttft_p95_ratio"] else ""
            print(f"target {name} {t['scenario']} {t['clients']} client(s): {t['tokens_ratio']:.2f}x tokens/s "
                  f"(>= {t['min_tokens_ratio']}){limit}: {'met' if t['met'] else 'MISSED'}")
    print(json.dumps({"bench": "serving", "model": str(model), "parallel": args.parallel, "ctx": args.ctx_size,
                      "threads": args.threads, "edge_threads": edge_threads, "max_tokens": args.max_tokens, "requests": args.requests,
                      "rounds": args.rounds, "rows": rows, "targets": verdicts, "raw": raw}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
