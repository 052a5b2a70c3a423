"""`edge-llm rerank`: a query and documents in, the documents ranked by the reranker's score out.

    edge-llm rerank -m bge-reranker-v2-m3 -q "capital of France?" -d "Paris is..." -d "Berlin is..."
    edge-llm rerank -m qwen3-reranker-0.6b -q "..." -f documents.txt --top-n 5 --json

Scores are the model's own, as llama-server's /v1/rerank returns them (a cross-encoder's logit,
Qwen3-Reranker's P(yes)); the table lists score, index and the document's start, best first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from edge_llm.commands.embed import texts_from
from edge_llm.engines.base import load_engine
from edge_llm.options import CommandParser, add_model_flags, load_options


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm rerank", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--query", required=True, help="the query")
    parser.add_argument("-d", "--document", dest="prompt", action="append", help="a document (repeat for several)")
    parser.add_argument("-f", "--file", default=None, help="documents, one per line (- reads standard input)")
    parser.add_argument("--top-n", type=int, default=None, metavar="N", help="only the N best")
    parser.add_argument("--json", action="store_true",
                        help="one JSON line per document: {index, relevance_score, document}")
    add_model_flags(parser, defaults={"n_parallel": 1})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    documents = texts_from(args, flag="-d")
    engine = load_engine(args.model, engine=args.engine, options=load_options(args), config=args.config)
    try:
        result = asyncio.run(engine.rerank(args.query, documents))
    finally:
        engine.close()
    order = sorted(range(len(documents)), key=lambda i: -result.scores[i])[:args.top_n]
    for i in order:
        if args.json:
            line = json.dumps({"index": i, "relevance_score": result.scores[i], "document": documents[i]},
                              ensure_ascii=False)
        else:
            text = documents[i] if len(documents[i]) <= 70 else documents[i][:67] + "..."
            line = f"{result.scores[i]:>12.6f}  {i:>5}  {text}"
        sys.stdout.write(line + "\n")
    return 0
