"""How long one heavy request stalls the others: /health latency while it runs, against idle.

Starts `edge-llm serve` on the bundled model (from --root: this checkout, or another one to
compare), then for each heavy request (the token pieces of a 7 MB text, detokenizing 1.5 M ids,
256 embeddings, a json_schema completion, a hostile chat template) polls /health from another
client while it runs. Prints a table and one JSON line.

    python scripts/bench_loop_stalls.py                       # this checkout
    python scripts/bench_loop_stalls.py --root /work/main     # another checkout, same measurement
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_latencies(url: str, until: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=120) as client:
        while not until.is_set():
            start = time.perf_counter()
            client.get(url + "/health")
            out.append(time.perf_counter() - start)
            time.sleep(0.005)


SEND = ("import sys, httpx; r = httpx.post(sys.argv[1], content=sys.stdin.read(), timeout=600, "
        "headers={'content-type': 'application/json'}); print(r.status_code)")


def measure(url: str, path: str, body: dict | None) -> dict:
    latencies: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=health_latencies, args=(url, done, latencies))
    poller.start()
    start = time.perf_counter()
    if body is None:
        time.sleep(3.0)
        status = 200
    else:
        # Sent from another process: receiving a 50 MB answer here would stall the poller itself.
        sender = subprocess.run([sys.executable, "-c", SEND, url + path], input=json.dumps(body, ensure_ascii=False),
                                text=True,
                                capture_output=True, check=True)
        status = int(sender.stdout)
    elapsed = time.perf_counter() - start
    done.set()
    poller.join()
    return {"status": status, "seconds": round(elapsed, 2), "health_polls": len(latencies),
            "health_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "health_max_ms": round(max(latencies) * 1000, 1)}


def evil_gguf(demo: Path, folder: Path) -> Path:
    """The demo model with a chat template whose render never ends."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    reader = gguf.GGUFReader(demo, "r")
    dst = folder / "evil.gguf"
    writer = gguf.GGUFWriter(dst, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE), help="the edge-llm checkout to serve from")
    parser.add_argument("--hostile-template", action="store_true",
                        help="also time a chat request whose template never ends (hangs a server without the sandbox)")
    args = parser.parse_args()
    from edge_llm.registry import demo_model_path

    demo = demo_model_path()
    tmp = Path(tempfile.mkdtemp())
    models = {"demo": demo}
    if args.hostile_template:
        models["evil"] = evil_gguf(demo, tmp)
    config = tmp / "models.toml"
    config.write_text("".join(f'[models.{n}]\nsource = "local"\npath = "{p}"\nn_ctx = 2048\n\n'
                              for n, p in models.items()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": args.root, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "edge_llm", "serve", "--config", str(config),
                               *models, "--port", str(port), "-np", "2", "-t", "1", "--preload",
                               "--keep-alive", "-1"], env=env, cwd=args.root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        text = "Hello world, héllo 世界! " * 260_000  # 7 MB of UTF-8
        ids = httpx.post(url + "/tokenize", json={"model": "demo", "content": "Once upon a time"}).json()["tokens"]
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 200},
                                                   "tags": {"type": "array", "items": {"type": "string"},
                                                            "maxItems": 200}}}
        cases = [
            ("idle", "", None),
            ("tokenize 7 MB with pieces", "/tokenize", {"model": "demo", "content": text, "with_pieces": True}),
            ("detokenize 1.5 M ids", "/detokenize", {"model": "demo", "tokens": ids * 375_000}),
            ("256 embeddings", "/v1/embeddings", {"model": "demo", "input": ["a cat sat on the mat"] * 256}),
            ("json_schema completion", "/v1/completions", {
                "model": "demo", "prompt": "A person:", "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}),
        ]
        if args.hostile_template:
            cases.append(("chat, never-ending template", "/v1/chat/completions", {
                "model": "evil", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
        measure(url, cases[4][1], cases[4][2])  # warm-up: first-use imports (the grammar converter)
        rows = {name: measure(url, path, body) for name, path, body in cases}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"{'request':32} {'status':>6} {'seconds':>8} {'/health p50 ms':>15} {'/health max ms':>15}")
    for name, row in rows.items():
        print(f"{name:32} {row['status']:>6} {row['seconds']:>8} {row['health_p50_ms']:>15} {row['health_max_ms']:>15}")
    print(json.dumps({"root": args.root, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
