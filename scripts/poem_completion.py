"""The classical-poem completion prompt as a one-shot batch: poem title -> poet, few-shot style.

    python scripts/poem_completion.py                      # the bundled demo model (English only: expect nonsense)
    python scripts/poem_completion.py -m qwen2-7b          # a Chinese-capable model answers 李商隐

It writes one JSONL record and runs `edge-llm batch` on it, so it is also the smallest example of
the batch file format.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "登鹳雀楼->王之涣\n夜雨寄北->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="model reference (default: the demo model)")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible server instead of loading the model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        # Stop at the end of the line: the answer is one name.
        inp.write_text(json.dumps({"id": "poem", "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                   "stop": ["\n"]}, ensure_ascii=False) + "\n", encoding="utf-8")
        command = [sys.executable, "-m", "edge_llm", "batch", str(inp), "-o", str(out), "--no-progress", "-np", "1"]
        command += ["-m", args.model] if args.model else []
        command += ["--url", args.url] if args.url else []
        subprocess.run(command, check=True)
        record = json.loads(out.read_text(encoding="utf-8"))
    if "error" in record:
        print(record["error"], file=sys.stderr)
        return 1
    print(PROMPT + record["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
