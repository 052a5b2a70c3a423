#!/usr/bin/env python3
"""Embedding and rerank throughput: edge-llm vs llama-server, same GGUF, same run.

- embed: 1,000 passages (50 words each, from the bundled KJV Genesis) to /v1/embeddings,
  in requests of 32 inputs, 4 requests in flight: passages per second.
- rerank: one query against 100 of those passages in one /v1/rerank request, repeated: documents
  per second.

Each server runs in its own process with a clean environment (scripts/bench_servers.py), started
for its task and stopped after it, the order rotated every round; the table shows the median of the
rounds and edge-llm's ratio (> 1: faster). Both servers' vectors and scores are compared too.

Models: `--embed-model` / `--rerank-model` GGUFs, or (default) random-weight checkpoints built and
converted here in the shapes of bge-small-en-v1.5 (BERT, 384 wide, 12 layers, CLS pooling) and of
a MiniLM-L12 cross-encoder on XLM-RoBERTa (384 wide, 12 layers): weights do not change the work,
shapes do. f16: this llama-server crashes on quantized pooled decodes on CPUs with AMX.

    python scripts/bench_embeddings.py [--llama-server PATH] [--rounds 3] [--threads 2] [--json out.json]

Only 127.0.0.1 is contacted. The machine's load average is printed beside the figures: a busy
machine makes the absolute numbers noisy; the ratio of alternating runs is the figure of merit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import (  # noqa: E402
    ROOT,
    edge_llm_spec,
    llama_server_binary,
    llama_server_spec,
    running,
    turn_order,
)

CORPUS = ROOT / "edge_llm" / "data" / "genesis-kjv.txt"
QUERY = "Who built the ark, and how large was it?"
SHAPE = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12,
             initializer_range=0.05)


def passages(n: int, words: int = 50) -> list[str]:
    """n passages of `words` words from the corpus, overlapping where it is too short for n apart."""
    tokens = CORPUS.read_text(encoding="utf-8").split()
    stride = min(words, (len(tokens) - words) // n)
    return [" ".join(tokens[i * stride:i * stride + words]) for i in range(n)]


def build_models(folder: Path) -> tuple[Path, Path]:
    """bge-small-shaped BERT embedder and a MiniLM-L12-shaped XLM-RoBERTa cross-encoder, random
    weights, tokenizers trained on the corpus, converted to f16 by edge-llm."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_embedding_models import train_unigram, train_wordpiece, write_st_modules

    from edge_llm.convert import convert

    torch.manual_seed(0)
    # Tokenizers trained on the corpus itself, with real vocabulary sizes: a passage is as many
    # tokens as with the real models (a 50-word passage: about 65).
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    wordpiece = train_wordpiece(folder / "wordpiece", corpus=lines, vocab_size=8000)
    tok = transformers.AutoTokenizer.from_pretrained(wordpiece)
    embedder = transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), max_position_embeddings=512,
                                                              **SHAPE)).eval()
    embedder.save_pretrained(folder / "embedder")
    for path in wordpiece.iterdir():
        (folder / "embedder" / path.name).write_bytes(path.read_bytes())
    write_st_modules(folder / "embedder", "cls")
    unigram = train_unigram(folder / "unigram", corpus=lines, vocab_size=8000)
    tok = transformers.AutoTokenizer.from_pretrained(unigram)
    reranker = transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(
        vocab_size=len(tok), max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=1, **SHAPE)).eval()
    reranker.save_pretrained(folder / "reranker")
    for path in unigram.iterdir():
        (folder / "reranker" / path.name).write_bytes(path.read_bytes())
    return (convert(folder / "embedder", folder / "embedder-f16.gguf", outtype="f16"),
            convert(folder / "reranker", folder / "reranker-f16.gguf", outtype="f16"))


async def embed_all(url: str, texts: list[str], per_request: int, in_flight: int) -> tuple[float, np.ndarray]:
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    vectors: list = [None] * len(chunks)
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            async with gate:
                response = await client.post(f"{url}/v1/embeddings", json={"input": chunks[i]})
                response.raise_for_status()
                vectors[i] = [d["embedding"] for d in sorted(response.json()["data"], key=lambda d: d["index"])]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(chunks))))
        return time.perf_counter() - start, np.array([v for chunk in vectors for v in chunk])


def rerank(url: str, documents: list[str]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": documents}, timeout=600)
    response.raise_for_status()
    seconds = time.perf_counter() - start
    scores = np.zeros(len(documents))
    for result in response.json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    return seconds, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed-model", default=None, help="an embedding GGUF (default: built here)")
    parser.add_argument("--rerank-model", default=None, help="a reranker GGUF (default: built here)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built from the sdist)")
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="llama-server's -t (edge-llm picks its own)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    binary = llama_server_binary(args.llama_server)
    texts = passages(args.passages)
    documents = texts[:args.documents]
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        if args.embed_model and args.rerank_model:
            embed_model, rerank_model = Path(args.embed_model), Path(args.rerank_model)
        else:
            print("building the models (random weights, real shapes)...", file=sys.stderr, flush=True)
            built = build_models(Path(tmp))
            embed_model = Path(args.embed_model) if args.embed_model else built[0]
            rerank_model = Path(args.rerank_model) if args.rerank_model else built[1]
        # Each as shipped: edge-llm's own threads (fewer while other programs hold cores), llama-server
        # -t N; llama-server's slots wide enough for one passage each (512 tokens).
        specs = {
            "embed": [edge_llm_spec(embed_model, parallel=1, ctx=512, threads=None),
                      llama_server_spec(binary, embed_model, parallel=8, ctx=4096, threads=args.threads,
                                        extra_args=("--embeddings",))],
            "rerank": [edge_llm_spec(rerank_model, parallel=1, ctx=512, threads=None),
                       llama_server_spec(binary, rerank_model, parallel=8, ctx=4096, threads=args.threads,
                                         extra_args=("--embeddings", "--rerank", "--pooling", "rank"))],
        }
        times: dict[tuple[str, str], list[float]] = {}
        outputs: dict[tuple[str, str], np.ndarray] = {}
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for task, pair in specs.items():
                for spec in turn_order(pair, r):
                    with running(spec) as server:
                        if task == "embed":
                            seconds, out = asyncio.run(embed_all(server.url, texts, 32, 4))
                        else:
                            seconds, out = rerank(server.url, documents)
                    times.setdefault((task, spec.name), []).append(seconds)
                    outputs[task, spec.name] = out
                    loads.append(os.getloadavg()[0])
                    print(f"round {r + 1} {task:6} {spec.name:12} {seconds:7.2f} s", file=sys.stderr, flush=True)

    rows = []
    for task, count in (("embed", len(texts)), ("rerank", len(documents))):
        ours, theirs = (statistics.median(times[task, name]) for name in ("edge-llm", "llama-server"))
        a, b = outputs[task, "edge-llm"], outputs[task, "llama-server"]
        if task == "embed":
            agreement = float((np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
        else:
            agreement = float(np.abs(a - b).max())
        rows.append({"task": task, "items": count, "edge_llm_per_s": count / ours, "llama_server_per_s": count / theirs,
                     "ratio": theirs / ours, "agreement": agreement})
    load = {"min": min(loads), "max": max(loads)}
    print(f"\nload average (1 min) during the run: {load['min']:.1f} .. {load['max']:.1f} on {os.cpu_count()} cores")
    print("| task | items | edge-llm /s | llama-server /s | ratio | agreement |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        what = "min cosine" if row["task"] == "embed" else "max |score diff|"
        print(f"| {row['task']} | {row['items']} | {row['edge_llm_per_s']:.1f} | {row['llama_server_per_s']:.1f} | "
              f"{row['ratio']:.2f}x | {what} {row['agreement']:.2e} |")
    result = {"bench": "embeddings", "rows": rows, "load": load, "rounds": args.rounds, "threads": args.threads,
              "embed_model": str(embed_model.name), "rerank_model": str(rerank_model.name)}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
