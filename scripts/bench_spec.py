#!/usr/bin/env python3
"""Speculative decoding (#17): edge-llm with and without it, against llama.cpp's `llama-server`
with and without its lookup decoding, same model, same slots, context and threads, same run.

Servers (`--servers`, each started in its own process with a clean environment,
scripts/bench_servers.py):
  - edge-llm-spec        `edge-llm serve ... --spec ngram` (--edge-spec-args)
  - edge-llm-off         `edge-llm serve ... --spec off`   (--edge-off-args): the baseline of the targets
  - llama-server-lookup  `llama-server ... --spec-type ngram-simple` with N=4, M=16 (--llama-lookup-args)
  - llama-server-off     `llama-server` as shipped (no speculation)
plus any --checkout NAME=PATH[:ARGS] (edge-llm from another checkout) and --llama-variant
NAME:ARGS (llama-server with other settings). --edge-checkout PATH runs the two edge-llm servers
from another checkout (one with the --spec flags, while this one lacks them).

Tasks, all greedy chat completions (the model's own template) with `ignore_eos`, so every
request generates exactly --max-tokens tokens (tokens are counted from `usage` all the same):
  - copy: "copy this text exactly" with one of four ~240-token passages of plain prose; the
    bundled SmolLM2-135M copies them almost word for word in this form (a system line "You copy
    text exactly." was the most faithful of the prompts tried: raw completions and "rewrite" or
    "repeat" instructions drift after a sentence or two). The table's `fidelity` column is the
    median word-level similarity of the output to the passage, so a drifting copy shows.
  - open: "Write a long, detailed story about <topic>".
Each task at every level of --clients (C clients, each sending --requests requests one after
another). Per (server, task, clients): generated tokens/s over the level's wall time, median over
--rounds; the servers take turns, the order rotating each round.

Reported: a markdown table (tokens/s; the ratios of every server to edge-llm-off, to
llama-server-lookup and to llama-server-off; the copies' fidelity; how many outputs of a
speculating server equal its no-speculation twin's, request by request: greedy speculation
should change none, though a batched verification can flip a near tie), the issue's targets
for edge-llm-spec over edge-llm-off (copy at 1 client >= 1.5x; open-ended and 4 clients
>= 0.97x), edge-llm-spec over the strongest other server of each case, then one JSON line.
Draft counters: edge-llm's /metrics samples whose names contain `spec` (the difference over
each level), and llama-server's per-request `draft_n` / `draft_n_accepted` timings.

llama-server's lookup setting (the default of --llama-lookup-args) is the strongest of those
tried on the copy task on a 2-core x86 machine (-t 2, 192 tokens, 3 requests per client, median
of 2 rounds; tokens/s at 1 client / 4 clients, accepted of drafted tokens at 1 client):
    none (llama-server-off)                       70.9 / 142.3
    ngram-simple N=4 M=16 (the default)           93.9 / 167.4   1038 of 1068
    ngram-map-k (N=12 M=48, its defaults)         97.4 / 125.7   1012 of 1120
    ngram-map-k N=4 M=16                          96.4 / 127.3   1038 of 1068
    ngram-cache                                   93.0 /  86.8    990 of 1032
    ngram-mod n-match 8, n-min 4, n-max 32        90.8 / 152.5   1022 of 1196
At 1 client these are within the noise of one another; at 4 clients ngram-simple N=4 leads
clearly (map-k drafts far less there, ngram-cache's drafts are mostly rejected). A first pass
(1 round, 1 client) also had ngram-simple with its defaults N=12 M=48 (1.51x llama-server-off),
N=3 M=8 (1.48x) and ngram-mod with its defaults (n-match 24, n-min 48: 1.34x) behind these.

At 1 client the copy task's tokens/s include reading the ~290-token prompt (about 0.9 s of
a 3 s request on 2 cores), which speculation cannot speed up; the `stream tokens/s p50`
column (each stream's rate after its first token, median) shows generation alone, and the
target lines give its ratio too.

Only 127.0.0.1 is contacted; the work is bounded by --rounds, --requests and --max-tokens
(the default run: about 7 minutes on 2 cores).

    python scripts/bench_spec.py [--llama-server PATH] [--rounds 2] [--clients 1,4] [--tasks copy,open]
        [--servers edge-llm-spec,edge-llm-off,llama-server-lookup,llama-server-off]
        [--edge-spec-args "--spec ngram --draft-max 16"] [--checkout NAME=PATH[:ARGS]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import hashlib
import json
import shlex
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import (  # noqa: E402
    ROOT,
    TOPICS,
    ServerSpec,
    Streamed,
    edge_llm_spec,
    llama_server_binary,
    llama_server_spec,
    parse_checkout,
    resolve_model,
    running,
    scrape_metrics,
    stop_on_sigterm,
    stream_completion,
    turn_order,
)

from edge_llm.engines.cpu_threads import default_threads  # noqa: E402

SPEC, OFF = "edge-llm-spec", "edge-llm-off"
LOOKUP, LLAMA_OFF = "llama-server-lookup", "llama-server-off"
SERVERS = (SPEC, OFF, LOOKUP, LLAMA_OFF)
BASELINES = (OFF, LOOKUP, LLAMA_OFF)  # the ratio columns
NO_SPEC = {SPEC: OFF, LOOKUP: LLAMA_OFF}  # whose outputs each speculating server's should equal
DEFAULT_LOOKUP_ARGS = "--spec-type ngram-simple --spec-ngram-simple-size-n 4 --spec-ngram-simple-size-m 16"
# The targets: edge-llm-spec / edge-llm-off at least this, per (task, clients).
TARGETS = {("copy", 1): 1.5, ("open", 1): 0.97, ("copy", 4): 0.97, ("open", 4): 0.97}

COPY_SYSTEM = "You copy text exactly."
PASSAGES = [
    "The harbour town woke slowly in winter. Before the sun rose over the grey water, the fishing boats were "
    "already leaving, their engines coughing in the cold air while the gulls circled above the masts. On the "
    "quay, the baker opened his shutters and set out trays of warm bread for the dock workers, who came in "
    "twos and threes with their hands deep in their pockets. The harbour master walked the length of the pier "
    "every morning at seven, checking the ropes and the ladders, and writing in a small notebook the names of "
    "the boats that had gone out. By nine the market hall was full of voices. Women sold eggs and cheese from "
    "the farms inland, a boy shouted the price of apples, and an old man repaired nets in the corner where the "
    "light from the high windows was best. Children ran between the stalls on their way to school, and the "
    "schoolteacher, a tall woman with a red scarf, counted them as they passed the church. In the afternoon the "
    "wind usually rose, and the boats came back one by one, low in the water with their catch. The town "
    "gathered to watch them unload, and the talk turned to the weather, the price of fuel, and the storm that "
    "everyone said would come before the end of the month.",
    "Maria had kept the small bookshop on the corner of the square for almost thirty years. It was a narrow "
    "room with shelves that reached the ceiling, a wooden ladder on rails, and a cat that slept in the window "
    "among the new novels. Every morning she unlocked the door at half past eight, swept the step, and made a "
    "pot of tea on the little stove behind the counter. Her regular customers knew that she would find any "
    "book they asked for, however old or strange, and that she would remember what they had bought the year "
    "before. A retired engineer came every Tuesday for books about bridges and railways. A young nurse bought "
    "poetry on her way home from the night shift. Students from the college sat on the floor in the back room "
    "and read for hours without buying anything, and Maria never asked them to leave. When the large chain "
    "store opened on the main road, people said that her shop would close within a year. Instead, more people "
    "came, because they wanted to talk to someone who had read the books and could tell them which one to "
    "take on a long journey, which one to give to a grieving friend, and which one to read aloud to a child.",
    "The expedition set out from the last village at dawn, with six people, four mules, and enough food for "
    "three weeks. The path followed the river for the first two days, through fields of barley and then "
    "through a forest of pine trees so dense that the light under them was green. On the third day they left "
    "the river and began to climb. The air grew thin and cold, and the mules moved slowly on the loose stones. "
    "At night they camped in the shelter of large rocks, cooked rice and lentils on a small fire, and listened "
    "to the wind moving across the slopes above them. The leader of the group, a quiet geologist named Daniel, "
    "kept careful records of everything they saw: the colour of the rocks, the plants that grew between them, "
    "the height of each camp, and the temperature at sunrise and sunset. On the sixth day they reached the "
    "glacier. It was much smaller than the old maps showed, and its edge was broken into blue towers of ice "
    "that cracked and fell in the afternoon sun. Daniel measured it for two days, then sat for a long time "
    "without speaking, looking at the bare valley where the ice had been when his father walked there.",
    "The city council met on the first Monday of every month in the old hall beside the river. The meetings "
    "began at six in the evening and were open to anyone who wished to attend, although most months only a "
    "few people came. This month was different. The room was full an hour before the meeting started, and "
    "people stood along the walls and in the corridor outside. The question on the agenda was whether the "
    "city should close the small park at the end of Station Road and sell the land to a company that wanted "
    "to build offices there. The mayor explained that the city needed the money to repair the schools and "
    "the public library. A teacher stood up and said that the children of the neighbourhood had nowhere else "
    "to play. A shop owner said that new offices would bring customers to the street. An elderly man spoke "
    "about the oak tree in the middle of the park, which his grandfather had planted when the railway was "
    "built. After three hours of discussion the council decided to delay the vote until the spring, and to "
    "ask the people who lived near the park to present a plan of their own for keeping it.",
]


def task_messages(task: str, index: int) -> list[dict]:
    """The chat of request number `index` of a task (requests cycle through passages / topics)."""
    if task == "copy":
        passage = PASSAGES[index % len(PASSAGES)]
        return [{"role": "system", "content": COPY_SYSTEM},
                {"role": "user", "content": f"Copy this text exactly:\n\n{passage}"}]
    if task == "open":
        return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[index % len(TOPICS)]}."}]
    raise ValueError(f"unknown task {task!r}: copy or open")


def copy_fidelity(output: str, passage: str) -> float:
    """Word-level similarity (0..1) of `output` to as many words of `passage` as it has: 1.0 is a
    verbatim copy of the passage's beginning."""
    words = output.split()
    return difflib.SequenceMatcher(None, words, passage.split()[:len(words)], autojunk=False).ratio()


def output_digest(text: str) -> str:
    """A short fingerprint of one output, to compare servers' outputs request by request."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def same_outputs(runs: list[dict], baseline_runs: list[dict]) -> tuple[int, int]:
    """How many requests gave the same output as the baseline's same request of the same round,
    of those both made: greedy speculation should not change a single one."""
    same = total = 0
    for run in runs:
        base = next((b for b in baseline_runs if b["round"] == run["round"]), None)
        if base:
            pairs = list(zip(run["outputs"], base["outputs"], strict=True))
            same += sum(a == b for a, b in pairs)
            total += len(pairs)
    return same, total


async def load(url: str, task: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` users, each sending `requests` requests of the task one after another."""
    # A new connection per request, as in bench_serving.py: a kept-alive connection the server is
    # just closing fails the next request for reasons not measured here.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def user(u: int) -> list[tuple[int, Streamed]]:
            out = []
            for r in range(requests):
                index = u * requests + r
                body = {"messages": task_messages(task, index), "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                out.append((index, await stream_completion(client, "/v1/chat/completions", body)))
            return out

        loop = asyncio.get_running_loop()
        start = loop.time()
        results = [item for items in await asyncio.gather(*(user(u) for u in range(clients))) for item in items]
        wall = loop.time() - start
    tokens = sum(r.tokens for _, r in results)
    row = {"task": task, "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(r.ttft for _, r in results),
           "decode_p50": statistics.median(r.decode_tokens_per_s for _, r in results),
           "outputs": [output_digest(r.text) for _, r in sorted(results, key=lambda item: item[0])]}
    if task == "copy":
        row["fidelity"] = statistics.median(copy_fidelity(r.text, PASSAGES[i % len(PASSAGES)]) for i, r in results)
    drafted = [r.timings["draft_n"] for _, r in results if "draft_n" in r.timings]
    if drafted:
        row["llama_draft_n"] = sum(drafted)
        row["llama_draft_accepted"] = sum(r.timings.get("draft_n_accepted", 0) for _, r in results)
    return row


def spec_counters(url: str) -> dict[str, float]:
    """edge-llm's /metrics samples about speculation (names containing `spec`); {} if none."""
    return {name: value for name, value in scrape_metrics(url).items() if "spec" in name}


def measure(spec: ServerSpec, tasks: list[str], levels: list[int], requests: int, max_tokens: int) -> list[dict]:
    rows = []
    with running(spec) as server:
        asyncio.run(load(server.url, "open", 1, 1, 8))  # first-call costs stay out of the figures
        for task in tasks:
            for clients in levels:
                before = spec_counters(server.url)
                try:
                    row = asyncio.run(load(server.url, task, clients, requests, max_tokens))
                except httpx.HTTPError:
                    print(f"{spec.name}: a request failed; the server's log ends with:\n{server.log_tail()}",
                          file=sys.stderr)
                    raise
                after = spec_counters(server.url)
                if after:
                    row["spec_metrics"] = {name: value - before.get(name, 0.0) for name, value in after.items()}
                rows.append(row)
    return rows


def summarize(raw: list[dict]) -> list[dict]:
    """The median over rounds of each (task, clients, server), with its ratio to each baseline
    of the same case that ran."""
    keys = []
    for r in raw:
        if (r["task"], r["clients"], r["server"]) not in keys:
            keys.append((r["task"], r["clients"], r["server"]))
    rows = []
    for task, clients, server in sorted(keys, key=lambda k: (k[0] != "copy", k[1])):
        runs = [r for r in raw if (r["task"], r["clients"], r["server"]) == (task, clients, server)]
        row = {"task": task, "clients": clients, "server": server, "rounds": len(runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "ttft_p50": statistics.median(r["ttft_p50"] for r in runs),
               "decode_p50": statistics.median(r["decode_p50"] for r in runs)}
        if all("fidelity" in r for r in runs):
            row["fidelity"] = statistics.median(r["fidelity"] for r in runs)
        for counter in ("llama_draft_n", "llama_draft_accepted"):
            if all(counter in r for r in runs):
                row[counter] = sum(r[counter] for r in runs)
        metrics: dict[str, float] = {}
        for r in runs:
            for name, value in r.get("spec_metrics", {}).items():
                metrics[name] = metrics.get(name, 0.0) + value
        if metrics:
            row["spec_metrics"] = metrics
        if server in NO_SPEC:
            baseline_runs = [r for r in raw if (r["task"], r["clients"], r["server"]) == (task, clients, NO_SPEC[server])]
            if baseline_runs:
                row["same_outputs"] = same_outputs(runs, baseline_runs)
        rows.append(row)
    for row in rows:
        row["ratios"] = {}
        for baseline in BASELINES:
            other = find(rows, row["task"], row["clients"], baseline)
            if other:
                row["ratios"][baseline] = row["tokens_per_s"] / other["tokens_per_s"]
    return rows


def find(rows: list[dict], task: str, clients: int, server: str) -> dict | None:
    return next((r for r in rows if (r["task"], r["clients"], r["server"]) == (task, clients, server)), None)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for edge-llm-spec over edge-llm-off, for the cases that ran."""
    out = []
    for (task, clients), minimum in TARGETS.items():
        row, off = find(rows, task, clients, SPEC), find(rows, task, clients, OFF)
        if row and off:
            ratio = row["tokens_per_s"] / off["tokens_per_s"]
            out.append({"task": task, "clients": clients, "ratio": round(ratio, 3), "min_ratio": minimum,
                        "met": ratio >= minimum,
                        "stream_ratio": round(row["decode_p50"] / off["decode_p50"], 3)})
    return out


def against_strongest(rows: list[dict]) -> list[dict]:
    """edge-llm-spec over the fastest other server of each case (the claim docs/benchmarks.md may make)."""
    out = []
    for row in rows:
        if row["server"] != SPEC:
            continue
        others = [r for r in rows if (r["task"], r["clients"]) == (row["task"], row["clients"])
                  and r["server"] != SPEC]
        if others:
            best = max(others, key=lambda r: r["tokens_per_s"])
            out.append({"task": row["task"], "clients": row["clients"], "strongest": best["server"],
                        "ratio": round(row["tokens_per_s"] / best["tokens_per_s"], 3)})
    return out


def drafts_note(row: dict) -> str:
    """Drafted / accepted tokens, from whichever server reported them."""
    if "llama_draft_n" in row:
        return f"{row['llama_draft_accepted']:.0f} / {row['llama_draft_n']:.0f}"
    metrics = row.get("spec_metrics") or {}
    drafted = next((v for k, v in metrics.items() if "draft" in k and "accept" not in k), None)
    accepted = next((v for k, v in metrics.items() if "accept" in k), None)
    if drafted is not None and accepted is not None:
        return f"{accepted:.0f} / {drafted:.0f}"
    return "; ".join(f"{k} {v:.0f}" for k, v in metrics.items()) or "-"


def markdown(rows: list[dict]) -> str:
    header = ("| task | clients | server | tokens/s | " + " | ".join(f"x {b}" for b in BASELINES)
              + " | TTFT p50 (s) | stream tokens/s p50 | copy fidelity | accepted / drafted | same output as no-spec |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ratios = " | ".join(f"{r['ratios'][b]:.2f}" if b in r["ratios"] else "-" for b in BASELINES)
        fidelity = f"{r['fidelity']:.2f}" if "fidelity" in r else "-"
        same = "{} / {}".format(*r["same_outputs"]) if "same_outputs" in r else "-"
        lines.append(f"| {r['task']} | {r['clients']} | {r['server']} | {r['tokens_per_s']:.1f} | {ratios} | "
                     f"{r['ttft_p50']:.3f} | {r['decode_p50']:.1f} | {fidelity} | {drafts_note(r)} | {same} |")
    return "\n".join(lines)


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """'NAME:ARGS' -> llama-server under that name with those flags."""
    name, _, args = text.partition(":")
    if not name:
        raise SystemExit(f"--llama-variant {text!r}: NAME:ARGS")
    return name, tuple(shlex.split(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="a .gguf or model reference (default: the demo model)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built once, cached)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"a subset of {','.join(SERVERS)}")
    parser.add_argument("--tasks", default="copy,open")
    parser.add_argument("--clients", default="1,4", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("-np", "--parallel", type=int, default=4)
    parser.add_argument("-c", "--ctx-size", type=int, default=8192)
    parser.add_argument("-t", "--threads", type=int, default=default_threads(), help="every server's -t")
    parser.add_argument("--edge-spec-args", default="--spec ngram", help="edge-llm-spec's flags")
    parser.add_argument("--edge-off-args", default="--spec off",
                        help="edge-llm-off's flags ('' for a checkout without --spec)")
    parser.add_argument("--edge-checkout", default=None, metavar="PATH",
                        help="run edge-llm-spec and edge-llm-off from this checkout (default: this one)")
    parser.add_argument("--llama-lookup-args", default=DEFAULT_LOOKUP_ARGS, help="llama-server-lookup's flags")
    parser.add_argument("--llama-variant", action="append", default=[], metavar="NAME:ARGS",
                        help="also run llama-server under this name with these flags")
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH[:ARGS]",
                        help="also run edge-llm from another checkout (e.g. a git worktree), with these flags")
    args = parser.parse_args()

    stop_on_sigterm()
    model = resolve_model(args.model)
    wanted = args.servers.split(",")
    unknown = set(wanted) - set(SERVERS)
    if unknown:
        raise SystemExit(f"--servers: unknown {sorted(unknown)}; choose from {','.join(SERVERS)}")
    common = dict(parallel=args.parallel, ctx=args.ctx_size, threads=args.threads)
    edge_checkout = Path(args.edge_checkout).resolve() if args.edge_checkout else ROOT
    edge_args = {SPEC: args.edge_spec_args, OFF: args.edge_off_args}
    llama_args = {LOOKUP: args.llama_lookup_args, LLAMA_OFF: ""}
    needs_llama = any(name in llama_args for name in wanted) or args.llama_variant
    binary = llama_server_binary(args.llama_server) if needs_llama else None
    specs: list[ServerSpec] = []
    for name in wanted:
        if name in edge_args:
            specs.append(edge_llm_spec(model, **common, name=name, extra_args=tuple(shlex.split(edge_args[name])),
                                       checkout=edge_checkout))
        else:
            specs.append(llama_server_spec(binary, model, **common, name=name,
                                           extra_args=tuple(shlex.split(llama_args[name]))))
    for text in args.checkout:
        name, path, extra = parse_checkout(text)
        specs.append(edge_llm_spec(model, **common, name=name, extra_args=extra, checkout=path))
    for text in args.llama_variant:
        name, extra = parse_variant(text)
        specs.append(llama_server_spec(binary, model, **common, name=name, extra_args=extra))
    tasks = args.tasks.split(",")
    levels = [int(c) for c in args.clients.split(",")]

    raw = []
    for rnd in range(args.rounds):
        for spec in turn_order(specs, rnd):
            for row in measure(spec, tasks, levels, args.requests, args.max_tokens):
                row.update(server=spec.name, round=rnd)
                raw.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    rows = summarize(raw)
    flags = {spec.name: " ".join(spec.argv[spec.argv.index("{port}") + 1:]) for spec in specs}
    print(f"model {model.name}, -np {args.parallel} -c {args.ctx_size} -t {args.threads}, greedy chat "
          f"completions of {args.max_tokens} tokens (ignore_eos), {args.requests} per client, "
          f"median of {args.rounds} rounds")
    for name, text in flags.items():
        print(f"- {name}: {text}")
    print()
    print(markdown(rows))
    print()
    for r in rows:
        for name, value in (r.get("spec_metrics") or {}).items():
            print(f"{r['server']} {r['task']} {r['clients']} client(s), all rounds: {name} {value:g}")
    verdicts = targets(rows)
    for t in verdicts:
        print(f"target {SPEC} / {OFF}, {t['task']} at {t['clients']} client(s): {t['ratio']:.2f}x "
              f"(>= {t['min_ratio']}): {'met' if t['met'] else 'MISSED'}; stream tokens/s {t['stream_ratio']:.2f}x")
    strongest = against_strongest(rows)
    for s in strongest:
        print(f"{SPEC} / strongest other ({s['strongest']}), {s['task']} at {s['clients']} client(s): "
              f"{s['ratio']:.2f}x")
    print(json.dumps({"bench": "spec", "model": str(model), "parallel": args.parallel, "ctx": args.ctx_size,
                      "threads": args.threads, "max_tokens": args.max_tokens, "requests": args.requests,
                      "rounds": args.rounds, "servers": flags, "rows": rows, "targets": verdicts,
                      "against_strongest": strongest, "raw": raw}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
