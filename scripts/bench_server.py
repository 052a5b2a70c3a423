"""Throughput of `edge-llm serve` over HTTP: N clients at once against the same N requests sent
one after another (the baseline, in the same run). Prints a table and a JSON line.

    python scripts/bench_server.py [--model MODEL] [--clients 4] [--tokens 64] [-np 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from live_server import live_server  # noqa: E402

from edge_llm.engines.base import LoadOptions  # noqa: E402
from edge_llm.server import ModelManager, create_app  # noqa: E402


def one(url: str, i: int, tokens: int, out: list) -> None:
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", timeout=600, json={
            "prompt": f"Story number {i}: once upon a time", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    out.append((first - start, time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("-np", "--parallel", type=int, default=4)
    args = parser.parse_args()
    manager = ModelManager.from_refs([args.model], options=LoadOptions(n_parallel=args.parallel), keep_alive=-1)
    with live_server(create_app(manager, preload=True)) as url:
        one(url, -1, 4, [])  # warm-up
        rows = {}
        for mode in ("sequential", "concurrent"):
            results: list = []
            start = time.perf_counter()
            if mode == "sequential":
                for i in range(args.clients):
                    one(url, i, args.tokens, results)
            else:
                threads = [threading.Thread(target=one, args=(url, i, args.tokens, results)) for i in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            wall = time.perf_counter() - start
            rows[mode] = {"wall_s": round(wall, 2), "tokens_per_s": round(args.clients * args.tokens / wall, 1),
                          "mean_ttft_ms": round(1000 * sum(r[0] for r in results) / len(results))}
    print(f"{'mode':<12} {'wall s':>8} {'tok/s':>8} {'TTFT ms':>8}")
    for mode, row in rows.items():
        print(f"{mode:<12} {row['wall_s']:>8} {row['tokens_per_s']:>8} {row['mean_ttft_ms']:>8}")
    print(json.dumps({"model": args.model, "clients": args.clients, "tokens": args.tokens, **rows,
                      "speedup": round(rows["concurrent"]["tokens_per_s"] / rows["sequential"]["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
