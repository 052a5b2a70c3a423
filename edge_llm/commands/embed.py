"""`edge-llm embed`: texts in, one JSON line per text out: {"index", "embedding"} (as llama-server's
/embedding returns it: pooled the model's way, normalized as --normalize says).

    edge-llm embed -m bge-small-en-v1.5 -p "a cat" -p "a dog"
    edge-llm embed -m nomic-embed-text-v1.5 -f passages.txt > vectors.jsonl   # one text per line

An embedding model pools as its file says (mean, CLS or last token); a chat model's states are
mean-pooled. All the texts share the engine's pooled decodes; Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from edge_llm.engines.base import load_engine
from edge_llm.errors import InvalidParameterError
from edge_llm.files import read_text
from edge_llm.options import CommandParser, add_model_flags, load_options


def texts_from(args: argparse.Namespace, flag: str = "-p") -> list[str]:
    """The texts of -p (repeated) and -f (one per non-empty line; "-" reads standard input)."""
    texts = list(args.prompt or [])
    if args.file is not None:
        data = sys.stdin.read() if args.file == "-" else read_text(args.file, "input file")
        texts += [line for line in data.splitlines() if line.strip()]
    if not texts:
        raise InvalidParameterError(f"nothing to do: give texts with {flag} or -f FILE", param="input")
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm embed", description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--prompt", action="append", help="a text to embed (repeat for several)")
    parser.add_argument("-f", "--file", default=None, help="texts to embed, one per line (- reads standard input)")
    parser.add_argument("--normalize", type=int, default=2, metavar="N",
                        help="-1 none, 0 max-abs int16, 1 taxicab, 2 euclidean (default), >2 p-norm "
                             "(llama-server's embd_normalize)")
    add_model_flags(parser, defaults={"n_parallel": 1})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    texts = texts_from(args)
    engine = load_engine(args.model, engine=args.engine, options=load_options(args), config=args.config)
    try:
        result = asyncio.run(engine.embeddings(texts, normalize=args.normalize))
    finally:
        engine.close()
    for i, vector in enumerate(result.vectors):
        sys.stdout.write(json.dumps({"index": i, "embedding": vector}) + "\n")
    return 0
