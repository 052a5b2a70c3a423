"""What the template sandbox costs per request: the bundled model's chat template rendered in its
sandbox process (edge_llm/template_sandbox.py) against the same render in-process, on a
one-message and a 20-message conversation. Prints a table and one JSON line.

    python scripts/bench_template_sandbox.py
"""

from __future__ import annotations

import json
import sys
import time


def per_render_us(render, messages, rounds: int) -> float:
    render(messages)  # warm-up: the sandbox process starts and compiles the template
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            render(messages)
        best = min(best, (time.perf_counter() - start) / rounds * 1e6)
    return best


def main() -> int:
    import gguf

    from edge_llm.chat_format import JinjaChatFormatter
    from edge_llm.registry import demo_model_path

    template = gguf.GGUFReader(demo_model_path(), "r").fields["tokenizer.chat_template"].contents()
    sandboxed = JinjaChatFormatter(template)
    in_process = JinjaChatFormatter(template, trusted=True)
    one = [{"role": "user", "content": "What is the capital of France?"}]
    twenty = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i}: " + "lorem ipsum " * 40}
              for i in range(19)] + one
    rows = {}
    try:
        start = time.perf_counter()
        JinjaChatFormatter(template).render(one)
        rows["first render (process start)"] = {"sandbox_us": round((time.perf_counter() - start) * 1e6)}
        for name, messages in (("1 message", one), ("20 messages", twenty)):
            rows[name] = {"sandbox_us": round(per_render_us(sandboxed.render, messages, 2000), 1),
                          "in_process_us": round(per_render_us(in_process.render, messages, 2000), 1)}
    finally:
        sandboxed.close()
    print(f"{'render':30} {'sandbox (us)':>13} {'in-process (us)':>16}")
    for name, row in rows.items():
        print(f"{name:30} {row['sandbox_us']:>13} {row.get('in_process_us', ''):>16}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
