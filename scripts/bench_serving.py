#!/usr/bin/env python3
"""Streaming load on loopback: `edge-llm serve` vs llama-cpp-python's own server, same model.

For each concurrency level C, C clients each send R streaming completions one after another;
the script reports aggregate generated tokens/s and the median and p95 time to first token.
Servers alternate level by level so machine noise hits both alike. Then a conversation test on
edge-llm: 5 conversations with a long shared-nothing first turn, run together, then their
second turns together; it reports the second turn's time to first token over the first's.

Only 127.0.0.1 is ever contacted; request counts and token counts are bounded.

    python scripts/bench_serving.py [-m MODEL.gguf] [--concurrency 1,4,8] [--requests 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a lighthouse", "the moon", "a forest", "a city at night", "a mountain", "a river",
          "an old library", "a train journey", "a garden in spring", "the desert", "a snowy village"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, health: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


@dataclass
class Result:
    ttft: float
    tokens: int


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Result:
    start = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    return Result((first or time.perf_counter()) - start, usage_tokens if usage_tokens is not None else chunks)


async def load(base_url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", timeout=600)
    model = (await client.models.list()).data[0].id

    async def user(u: int) -> list[Result]:
        out = []
        for r in range(requests):
            topic = TOPICS[(u * requests + r) % len(TOPICS)]
            out.append(await one_request(client, model, f"Write a long, detailed story about {topic}.\n\n",
                                         max_tokens))
        return out

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(user(u) for u in range(concurrency))) for r in rs]
    wall = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": sum(r.tokens for r in results),
            "tokens_per_s": sum(r.tokens for r in results) / wall, "ttft_median": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], "wall_s": wall}


async def conversations(base_url: str, n: int = 5) -> dict:
    """Second-turn time to first token vs first turn, n conversations interleaved."""
    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", timeout=600)
    model = (await client.models.list()).data[0].id
    document = " ".join(f"Paragraph {i}: the committee met again and discussed {TOPICS[i % len(TOPICS)]}, "
                        "its history, its costs and the many opinions of its members." for i in range(30))

    async def turn(messages: list[dict]) -> tuple[float, str]:
        start = time.perf_counter()
        first, text = None, ""
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        return (first or time.perf_counter()) - start, text

    histories = [[{"role": "user", "content": f"Conversation {i}. Read this:\n{document}\nSummarise it."}]
                 for i in range(n)]
    firsts = await asyncio.gather(*(turn(h) for h in histories))
    for h, (_, answer) in zip(histories, firsts, strict=True):
        h += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Shorter, please."}]
    seconds = await asyncio.gather(*(turn(h) for h in histories))
    t1 = statistics.median(t for t, _ in firsts)
    t2 = statistics.median(t for t, _ in seconds)
    return {"conversations": n, "ttft_turn1_median": t1, "ttft_turn2_median": t2, "ratio": t2 / t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="a .gguf (default: the bundled demo model)")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slot-ctx", type=int, default=1024, help="context per slot")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from edge_llm.registry import load_registry, resolve

    model = str(resolve(args.model, load_registry()).path)
    levels = [int(c) for c in args.concurrency.split(",")]
    n_par = max(levels + [5])
    threads = str(len(os.sched_getaffinity(0)))
    edge_port, llama_port = free_port(), free_port()
    edge = start([sys.executable, "-m", "edge_llm", "serve", model, "--port", str(edge_port), "-np", str(n_par),
                  "-c", str(n_par * args.slot_ctx), "-t", threads], edge_port, "/health")
    llama = start([sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(llama_port),
                   "--n_ctx", str(args.slot_ctx), "--n_threads", threads, "--n_threads_batch", threads,
                   "--interrupt_requests", "False", "--verbose", "False"], llama_port, "/v1/models")
    rows = []
    try:
        for c in levels:
            for name, port in (("edge-llm", edge_port), ("llama-cpp-python server", llama_port)):
                row = asyncio.run(load(f"http://127.0.0.1:{port}", c, args.requests, args.max_tokens))
                row["server"] = name
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        convo = asyncio.run(conversations(f"http://127.0.0.1:{edge_port}"))
    finally:
        for proc in (edge, llama):
            proc.terminate()
            proc.wait(timeout=30)

    def get(server: str, c: int) -> dict:
        return next(r for r in rows if r["server"] == server and r["concurrency"] == c)

    print("| server | clients | tokens/s | TTFT median (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['ttft_median']:.2f} | "
              f"{r['ttft_p95']:.2f} |")
    top = max(levels)
    summary = {
        "edge_vs_llama_at_max": get("edge-llm", top)["tokens_per_s"] / get("llama-cpp-python server", top)["tokens_per_s"],
        "edge_scaling_max_vs_1": get("edge-llm", top)["tokens_per_s"] / get("edge-llm", min(levels))["tokens_per_s"],
        "edge_ttft_p95_at_max": get("edge-llm", top)["ttft_p95"],
        **{f"conversation_{k}": v for k, v in convo.items()},
    }
    print(f"\nat {top} clients: edge-llm / llama-cpp-python server = {summary['edge_vs_llama_at_max']:.2f}x; "
          f"edge-llm {top} clients / 1 client = {summary['edge_scaling_max_vs_1']:.2f}x; "
          f"p95 TTFT {summary['edge_ttft_p95_at_max']:.2f} s")
    print(f"second turn TTFT / first turn TTFT ({convo['conversations']} conversations interleaved): "
          f"{convo['ratio']:.3f} ({convo['ttft_turn2_median']:.3f} s / {convo['ttft_turn1_median']:.3f} s)")
    print(json.dumps({"bench": "serving", "model": model, "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
