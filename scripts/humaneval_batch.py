"""A HumanEval-style run against a server: each record has `task_id`, `prompt` (a function
signature and docstring), `entry_point` and `test`; the model completes the body.

    edge-llm serve -m qwen2-7b --port 8080 -np 4 &      # any OpenAI-compatible server works
    python scripts/humaneval_batch.py --url http://127.0.0.1:8080
    python scripts/humaneval_batch.py --url http://127.0.0.1:8080 --problems HumanEval.jsonl --execute

Without --problems it uses four small problems in HumanEval's format (written for this script).
The run is `edge-llm batch --template '{prompt}' --stop ...`, so it resumes if interrupted.
--execute runs each completion against its tests in a separate Python process with a time limit
and prints pass@1; model-written code is untrusted: only do this in a sandbox.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBLEMS = [
    {"task_id": "Demo/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
     "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    {"task_id": "Demo/1", "entry_point": "is_palindrome",
     "prompt": 'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards.\n'
               '    >>> is_palindrome("level")\n    True\n    """\n',
     "test": "def check(f):\n    assert f('level')\n    assert not f('levels')\n    assert f('')\n"},
    {"task_id": "Demo/2", "entry_point": "count_vowels",
     "prompt": 'def count_vowels(word: str) -> int:\n    """Count the vowels (a, e, i, o, u) in a lower-case word.\n'
               '    >>> count_vowels("banana")\n    3\n    """\n',
     "test": "def check(f):\n    assert f('banana') == 3\n    assert f('xyz') == 0\n"},
    {"task_id": "Demo/3", "entry_point": "largest",
     "prompt": 'def largest(numbers: list) -> int:\n    """Return the largest number of a non-empty list.\n'
               '    >>> largest([3, 9, 2])\n    9\n    """\n',
     "test": "def check(f):\n    assert f([3, 9, 2]) == 9\n    assert f([-5, -2]) == -2\n"},
]
# HumanEval's usual stop sequences: the model has finished the function body.
STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def run_tests(record: dict, timeout: float) -> bool:
    program = record["prompt"] + record["output"] + "\n\n" + record["test"] + f"\ncheck({record['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, capture_output=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--problems", default=None, help="a HumanEval-format JSONL (default: four demo problems)")
    parser.add_argument("-o", "--output", default="humaneval-completions.jsonl")
    parser.add_argument("-np", "--parallel", type=int, default=4, help="requests in flight")
    parser.add_argument("--execute", action="store_true", help="run the tests (untrusted code: use a sandbox)")
    args = parser.parse_args()
    problems = Path(args.problems) if args.problems else Path(tempfile.mkdtemp()) / "problems.jsonl"
    if not args.problems:
        problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    command = [sys.executable, "-m", "edge_llm", "batch", str(problems), "-o", args.output, "--url", args.url,
               "-np", str(args.parallel), "--template", "{prompt}", "-n", "256", "--temp", "0", "--sort"]
    for stop in STOPS:
        command += ["--stop", stop]
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in Path(args.output).read_text(encoding="utf-8").splitlines() if line]
    passed = 0
    for record in records:
        if "error" in record:
            print(f"{record.get('task_id', record['line'])}: error: {record['error']}")
            continue
        verdict = ""
        if args.execute:
            ok = run_tests(record, timeout=10)
            passed += ok
            verdict = "pass" if ok else "FAIL"
        print(f"{record['task_id']}: {verdict} {record['usage']['completion_tokens']} tokens, "
              f"{record['finish_reason']}")
    if args.execute:
        print(f"pass@1: {passed}/{len(records)} = {passed / max(len(records), 1):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
