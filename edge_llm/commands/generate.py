"""`edge-llm generate`: one prompt in, the completion streamed to stdout (like llama-cli -p ... -no-cnv).

Not named `generate.py`: importing a submodule sets it as an attribute of the package, and
`edge_llm.generate` must stay the Python API's function (edge_llm/api.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from edge_llm.engines.base import load_engine
from edge_llm.files import decode_utf8, read_text
from edge_llm.options import CommandParser, add_model_flags, add_sampling_flags, load_options, sampling_params


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm generate", description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", metavar="PROMPT", help="the prompt text (or -p, -f; else stdin when piped)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="the prompt text")
    source.add_argument("-f", "--file", help="read the prompt from a file (- for stdin)")
    parser.add_argument("-no-cnv", "--no-conversation", action="store_true",
                        help="accepted for llama-cli's habit: generate never converses (edge-llm chat does)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_model_flags(parser, defaults={"n_parallel": 1})
    add_sampling_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompt = prompt_of(args, parser)
    params = sampling_params(args)
    engine = load_engine(args.model, engine=args.engine, options=load_options(args), config=args.config)
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            prompt = engine.chat_prompt(messages + [{"role": "user", "content": prompt}])
        start = time.perf_counter()
        first = None
        usage = None
        for delta in engine.stream(prompt, params):
            if first is None:
                first = time.perf_counter()
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            usage = delta.usage or usage
        sys.stdout.write("\n")
        if args.stats and usage is not None:
            _print_stats(usage, start, first)
    finally:
        engine.close()
    return 0


def prompt_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The one prompt: PROMPT, -p, -f FILE, -f - (stdin), or stdin when it is piped and none is given."""
    given = [flag for flag, value in (("PROMPT", args.text), ("-p", args.prompt), ("-f", args.file))
             if value is not None]
    if len(given) > 1:
        parser.error(f"one prompt at a time: {' and '.join(given)} both given")
    if args.text is not None or args.prompt is not None:
        return args.text if args.text is not None else args.prompt
    if args.file == "-" or (args.file is None and not sys.stdin.isatty()):
        return decode_utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    if args.file is None:
        parser.error('no prompt: give one (edge-llm generate "TEXT"), -p TEXT, -f FILE, or pipe it in (-f -)')
    return read_prompt_file(args.file)


def read_prompt_file(path: str) -> str:
    """A prompt file's text, or one clear error line (shared by `generate -f` and `chat -f`)."""
    return read_text(path, "prompt file")


def _print_stats(usage: Any, start: float, first: float | None) -> None:
    end = time.perf_counter()
    ttft = (first or end) - start
    decode = max(end - (first or end), 1e-9)
    rate = max(usage.completion_tokens - 1, 0) / decode
    print(f"prompt: {usage.prompt_tokens} tokens ({usage.cached_tokens} cached), first token after "
          f"{ttft * 1000:.0f} ms; generated {usage.completion_tokens} tokens, {rate:.1f} tokens/s"
          f"{drafts_note(usage)}", file=sys.stderr)


def drafts_note(usage: Any) -> str:
    """Speculative decoding's part of a --stats line (generate, chat), or nothing."""
    if not getattr(usage, "draft_tokens", 0):
        return ""
    return f"; drafts: {usage.accepted_tokens} of {usage.draft_tokens} kept"
