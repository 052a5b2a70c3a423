#!/usr/bin/env python3
"""More conversations than slots, two turns each: edge-llm vs llama-server, same model, same run.

K conversations (default 12) with a first turn of about 450 tokens each, over fewer slots
(`-np 4 -c 8192`): all first turns, then all second turns (history + answer + a short question),
`--parallel` at a time. A server that keeps only its slots' caches reads every evicted history
again; one with a prompt cache beyond the slots restores it and reads only the new question.
The figure of merit is the median second-turn time to first token over the first turn's.

Runs, each server in its own process with a clean environment (scripts/bench_servers.py):
  - edge-llm as shipped (host-memory prompt cache on), and with `--cache-ram 0` (slots only);
  - llama-server as shipped (its `--cache-ram` is on by default);
  - "restart": first turns, the server stopped and started again, then the second turns:
    edge-llm with `--cache-dir`, llama-server as shipped (it has no disk tier for this);
  - edge-llm with `-kvu` (unified KV), to weigh that default.

Only 127.0.0.1 is contacted; prompt and answer sizes are bounded.

    python scripts/bench_prompt_cache.py [-m MODEL.gguf] [--llama-server PATH] [--conversations 12]
        [--parallel 4] [--ctx 8192] [--threads 2] [--scenario quiet|contended] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import (  # noqa: E402
    ROOT,
    RunningServer,
    ServerSpec,
    edge_llm_spec,
    llama_server_binary,
    llama_server_spec,
    resolve_model,
    running,
    scenario,
)

CORPUS = ROOT / "edge_llm" / "data" / "genesis-kjv.txt"
FIRST_QUESTION = "Summarise this passage in two sentences."
SECOND_QUESTION = "Which person in it matters most, and why?"


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int | None
    cached_tokens: int | None
    answer: str


@dataclass
class Run:
    name: str
    first: list[Turn] = field(default_factory=list)
    second: list[Turn] = field(default_factory=list)
    rounds_s: list[float] = field(default_factory=list)  # wall time of each round of turns
    wall_s: float = 0.0
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(t.ttft for t in self.second) / statistics.median(t.ttft for t in self.first)

    def summary(self) -> dict:
        def stats(turns: list[Turn]) -> dict:
            return {"ttft_median_s": round(statistics.median(t.ttft for t in turns), 4),
                    "ttft_max_s": round(max(t.ttft for t in turns), 4),
                    "prompt_tokens_median": _median([t.prompt_tokens for t in turns]),
                    "cached_tokens_median": _median([t.cached_tokens for t in turns])}
        return {"name": self.name, "first": stats(self.first), "second": stats(self.second),
                "second_over_first": round(self.ratio, 3), "rounds_s": [round(r, 2) for r in self.rounds_s],
                "wall_s": round(self.wall_s, 2), "note": self.note}


def _median(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def passages(count: int, words: int) -> list[str]:
    """`count` disjoint passages of about `words` words from the bundled corpus."""
    text = CORPUS.read_text(encoding="utf-8").split()
    if len(text) < count * words:
        raise SystemExit(f"the corpus has {len(text)} words; {count} x {words} asked")
    return [" ".join(text[i * words:(i + 1) * words]) for i in range(count)]


async def chat_turn(client: AsyncOpenAI, messages: list[dict], max_tokens: int) -> Turn:
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    prompt_tokens = cached = None
    stream = await client.chat.completions.create(model="", messages=messages, max_tokens=max_tokens, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) if details is not None else None
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    return Turn((first or time.perf_counter()) - start, prompt_tokens, cached, "".join(parts))


async def one_round(url: str, conversations: list[list[dict]], parallel: int, max_tokens: int) -> list[Turn]:
    """Each conversation's next turn, `parallel` at a time, in order; answers are appended."""
    gate = asyncio.Semaphore(parallel)
    # A fresh connection per request: a kept-alive one that the server closes just as the next
    # request goes out fails that request (seen with llama-server), and no retry hides it here.
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=600)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http) as client:
        async def run(messages: list[dict]) -> Turn:
            async with gate:
                turn = await chat_turn(client, messages, max_tokens)
            messages.append({"role": "assistant", "content": turn.answer})
            return turn

        return list(await asyncio.gather(*(run(m) for m in conversations)))


def fresh_conversations(texts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{text}\n\n{FIRST_QUESTION}"}] for text in texts]


def ask_again(conversations: list[list[dict]]) -> None:
    for messages in conversations:
        messages.append({"role": "user", "content": SECOND_QUESTION})


def warm_up(url: str) -> None:
    """One tiny request first: a fresh process pages the weights in and builds its compute graphs
    on its first decode, for either server; that start-up cost is not what is compared here."""
    httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 1}, timeout=300).raise_for_status()


def measure(name: str, specs: list[ServerSpec], texts: list[str], args: argparse.Namespace) -> Run:
    """First turns on specs[0]; second turns on the same server, or on specs[1] started after
    the first one was stopped (a restart)."""
    run = Run(name)
    conversations = fresh_conversations(texts)
    start = time.perf_counter()
    def timed_round(server: RunningServer) -> list[Turn]:
        t0 = time.perf_counter()
        try:
            turns = asyncio.run(one_round(server.url, conversations, args.parallel, args.max_tokens))
        except Exception:
            print(f"{name}: a round failed; the server's log ends with:\n{server.log_tail()}", file=sys.stderr)
            raise
        run.rounds_s.append(time.perf_counter() - t0)
        return turns

    with running(specs[0]) as server:
        warm_up(server.url)
        run.first = timed_round(server)
        ask_again(conversations)
        if len(specs) == 1:
            run.second = timed_round(server)
            run.note = _cache_note(server.url)
    if len(specs) == 2:
        with running(specs[1]) as server:
            warm_up(server.url)
            run.second = timed_round(server)
            run.note = _cache_note(server.url)
    run.wall_s = time.perf_counter() - start
    print(f"  {name}: second/first TTFT {run.ratio:.3f}  ({run.wall_s:.1f} s)", file=sys.stderr, flush=True)
    return run


def _cache_note(url: str) -> str:
    """edge-llm's own count of restored tokens, from /metrics (llama-server has no such series)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""
    for line in text.splitlines():
        if line.startswith("edge_llm:prompt_cache_restored_tokens_total"):
            return f"restored {float(line.rsplit(' ', 1)[1]):.0f} tokens"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="a .gguf or registry name (default: the demo model)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built from the sdist)")
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=4, help="slots (-np) and requests at a time")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--words", type=int, default=330, help="passage length (330 words: ~450 tokens)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--scenario", choices=["quiet", "contended"], default="quiet")
    parser.add_argument("--only", default=None, help="comma-separated run names to do (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="do the whole list this many times, interleaved")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    model = resolve_model(args.model)
    binary = llama_server_binary(args.llama_server)
    texts = passages(args.conversations, args.words)
    common = dict(parallel=args.parallel, ctx=args.ctx, threads=args.threads)
    edge = edge_llm_spec(model, **common)
    # Each repeat gets an empty cache folder: the restart run must not find the last repeat's turns.
    cache_dirs = [Path(tempfile.mkdtemp(prefix="bench-prompt-cache-")) for _ in range(args.repeat)]
    edge_disk = [edge_llm_spec(model, **common, extra_args=("--cache-dir", str(d))) for d in cache_dirs]
    plans = {
        "edge-llm": [edge],
        "llama-server": [llama_server_spec(binary, model, **common)],
        "edge-llm --cache-ram 0": [edge_llm_spec(model, **common, extra_args=("--cache-ram", "0"))],
        "edge-llm -kvu": [edge_llm_spec(model, **common, extra_args=("-kvu",))],
        "edge-llm restart --cache-dir": None,  # one folder per repeat, below
        "llama-server restart": [llama_server_spec(binary, model, **common)] * 2,
    }
    wanted = args.only.split(",") if args.only else list(plans)
    print(f"{args.conversations} conversations over {args.parallel} slots, -c {args.ctx}, -t {args.threads}, "
          f"{args.scenario}; model {model.name}", file=sys.stderr)
    runs = []
    with scenario(args.scenario):
        for repeat in range(args.repeat):
            for name in wanted:
                specs = plans[name] or [edge_disk[repeat]] * 2
                runs.append(measure(name, specs, texts, args))

    print("\n| run | first turn: prompt tokens | TTFT median | second turn: prompt / cached tokens | "
          "TTFT median | second / first | rounds (s) |")
    print("|---|---|---|---|---|---|---|")
    for d in cache_dirs:
        shutil.rmtree(d, ignore_errors=True)
    for run in runs:
        s = run.summary()
        f, t = s["first"], s["second"]
        cached = "?" if t["cached_tokens_median"] is None else f"{t['cached_tokens_median']:.0f}"
        print(f"| {run.name} | {f['prompt_tokens_median']:.0f} | {f['ttft_median_s'] * 1000:.0f} ms | "
              f"{t['prompt_tokens_median']:.0f} / {cached} | {t['ttft_median_s'] * 1000:.0f} ms | "
              f"**{s['second_over_first']:.3f}** | {' + '.join(f'{r:.1f}' for r in run.rounds_s)} |")
    result = {"bench": "prompt_cache", "conversations": args.conversations, "parallel": args.parallel,
              "ctx": args.ctx, "threads": args.threads, "scenario": args.scenario, "model": model.name,
              "runs": [r.summary() for r in runs]}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
