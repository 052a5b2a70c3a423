"""A chat-style batch in-process: several conversations answered together through the engine's
parallel slots, with the Python API behind `edge-llm batch`.

    python scripts/chat_batch.py                 # the bundled demo model, 4 slots
    python scripts/chat_batch.py -m qwen2-7b -np 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edge_llm.commands.batch import BatchRunner, EngineBackend, OutputWriter, read_records
from edge_llm.engines.base import load_engine
from edge_llm.load_options import LoadOptions
from edge_llm.sampling import SamplingParams

CONVERSATIONS = [
    {"id": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"id": "haiku", "messages": [{"role": "system", "content": "You are a poet."},
                                 {"role": "user", "content": "Write a haiku about the sea."}], "temperature": 0.7},
    {"id": "math", "messages": [{"role": "user", "content": "What is 12 times 12?"}], "max_tokens": 24},
    {"id": "follow-up", "messages": [
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Name another one."}]},
    {"id": "translate", "messages": [{"role": "user", "content": "Translate 'good morning' into Spanish."}]},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-np", "--parallel", type=int, default=4)
    args = parser.parse_args()
    engine = load_engine(args.model, options=LoadOptions(n_parallel=args.parallel, n_ctx=1024 * args.parallel))
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "chats.jsonl", Path(tmp) / "answers.jsonl"
        inp.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS), encoding="utf-8")
        runner = BatchRunner(EngineBackend(engine), SamplingParams.create(max_tokens=64, temperature=0), {},
                             concurrency=args.parallel)
        writer = OutputWriter(out)
        try:
            summary = runner.run(read_records(inp), writer, done=set())
        finally:
            writer.close()
            engine.close()
        for line in out.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            print(f"[{record['id']}] {record['messages'][-1]['content']}\n  -> {record.get('output', record.get('error'))!r}"
                  f"  ({record.get('finish_reason')}, {record.get('usage', {}).get('completion_tokens')} tokens)")
    print(f"{summary.done} answered in {summary.seconds:.1f} s, {summary.completion_tokens} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
