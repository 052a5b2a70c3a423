"""Scaling out on Ray Serve: aggregate tokens/s and time to first token of multi-turn conversations,
for one plain `edge-llm serve` and for `edge-llm serve --ray local` with 1, 2 and 3 replicas under
each router (affinity, Serve's default power of two choices). Each configuration is its own
process (and, for Ray, its own local cluster), started from a clean environment, in turn.

    python scripts/bench_fleet.py                       # bundled model, 12 conversations x 2 turns
    python scripts/bench_fleet.py --replicas 1 2 4 --conversations 32 --cores 16 --json out.json

The workload: C conversations at once, each opening with its own ~400-token message; every first
turn finishes before the second turns start (so caches and slots are contested), and each turn
streams `--max-tokens` tokens. Reported per configuration: completion tokens/s over both turns,
TTFT median and p95 of each turn, the turn-2/turn-1 median TTFT ratio (how well a returning
conversation finds its KV state), and how many second turns resumed from cache.

Honest limits: replicas on one machine share its cores, so on a 2-core box more replicas cannot add
throughput (each gets fewer threads); what this box can show is the routing (turn-2 ratio, resumed
turns). On a machine with more cores, or a real multi-node cluster (`--ray ADDRESS` by hand), give
`--cores` the CPUs Ray may use: each replica reserves cores / replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx
from bench_servers import edge_llm_spec, resolve_model, running

WORDS = ("river stone lantern orchard copper meadow whistle harbor tidal ember velvet canyon maple "
         "signal quarry thistle beacon saddle glacier ribbon").split()


def opening(seed: int) -> str:
    rng = random.Random(seed)
    return f"Notes {seed}: " + " ".join(rng.choice(WORDS) for _ in range(300)) + "\nSummarise the notes."


async def turn(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, parts, usage = time.perf_counter(), None, [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    parts.append(choice["delta"]["content"])
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": (first or time.perf_counter()) - start, "text": "".join(parts),
            "prompt": usage.get("prompt_tokens", 0), "cached": details.get("cached_tokens", 0),
            "tokens": usage.get("completion_tokens", len(parts))}


async def conversations(url: str, n: int, seed: int, max_tokens: int) -> tuple[list[dict], list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        histories = [[{"role": "user", "content": opening(seed + i)}] for i in range(n)]
        firsts = await asyncio.gather(*(turn(client, model, h, max_tokens) for h in histories))
        for history, first in zip(histories, firsts, strict=True):
            history += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And now?"}]
        seconds = await asyncio.gather(*(turn(client, model, h, max_tokens) for h in histories))
        return firsts, seconds, time.perf_counter() - start


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def summary(name: str, firsts: list[dict], seconds: list[dict], wall: float) -> dict:
    ttft1, ttft2 = [t["ttft"] for t in firsts], [t["ttft"] for t in seconds]
    return {"config": name, "tokens_per_s": sum(t["tokens"] for t in firsts + seconds) / wall,
            "ttft1_p50": statistics.median(ttft1), "ttft1_p95": p95(ttft1),
            "ttft2_p50": statistics.median(ttft2), "ttft2_p95": p95(ttft2),
            "turn2_ratio": statistics.median(ttft2) / statistics.median(ttft1),
            "resumed": sum(s["cached"] >= f["prompt"] - 4 for f, s in zip(firsts, seconds, strict=True)), "of": len(firsts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--routers", nargs="+", default=["affinity", "pow2"], choices=["affinity", "pow2"])
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("-np", "--parallel", type=int, default=4, help="slots per server / replica")
    parser.add_argument("--cores", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs the servers may use; each replica reserves cores / replicas")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    model = resolve_model(args.model)
    common = ("--temp", "0", "--preload")
    configs = [("single server", edge_llm_spec(model, parallel=args.parallel, ctx=4096 * args.parallel,
                                               threads=max(1, int(args.cores)), extra_args=common))]
    for replicas in args.replicas:
        for router in args.routers:
            share = args.cores / replicas
            configs.append((f"ray x{replicas} {router}", edge_llm_spec(
                model, parallel=args.parallel, ctx=4096 * args.parallel, threads=max(1, int(share)),
                extra_args=(*common, "--ray", "local", "--replicas", str(replicas), "--replica-cpus",
                            f"{share:g}", "--router", router))))
    rows = []
    for i, (name, spec) in enumerate(configs):
        with running(spec, timeout=600) as server:
            firsts, seconds, wall = asyncio.run(conversations(server.url, args.conversations, 1000 * (i + 1),
                                                              args.max_tokens))
        rows.append(summary(name, firsts, seconds, wall))
        row = rows[-1]
        print(f"{name:24} {row['tokens_per_s']:7.1f} tok/s  TTFT turn 1 {row['ttft1_p50']:.2f}/{row['ttft1_p95']:.2f} s"
              f"  turn 2 {row['ttft2_p50']:.2f}/{row['ttft2_p95']:.2f} s  ratio {row['turn2_ratio']:.3f}"
              f"  resumed {row['resumed']}/{row['of']}", flush=True)
    print(json.dumps({"bench": "fleet", "load_avg": os.getloadavg(), "rows": rows}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
