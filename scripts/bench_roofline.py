#!/usr/bin/env python3
"""How close single-stream decode comes to what the memory bandwidth allows (the roofline).

A decode step of one token reads every weight once (the token embedding excepted: one row of it,
unless it is also the output layer) plus the KV cells of the context, so on a CPU it can go no
faster than memory bandwidth / bytes read per token. This script:

1. measures the machine's memory bandwidth, STREAM-style, with numpy on T threads (numpy releases
   the GIL inside these loops): `read` (max of an array), `copy` (b = a) and `triad` (a = b + s * c),
   each over arrays much larger than the caches, best of --repeats, bytes counted as STREAM does
   (read: a max over the array, numpy's reduction that runs at memory speed);
2. counts the bytes a decode step reads from the model's GGUF (tensor sizes, gguf-py);
3. measures edge-llm's single-stream decode speed in this process (the engine, greedy, --spec off,
   -t T, --no-adapt-threads: the speed of T threads, not of a governor's choice), the prompt's
   reading excluded;

and prints decode tokens/s as a fraction of read bandwidth / bytes per token (the issue's goal for
the 1B model: >= 0.8). Nothing but this process and its threads; about a minute.

    python scripts/bench_roofline.py [-m llama3.2-1b] [-t 2] [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import resolve_model  # noqa: E402

from edge_llm.engines.cpu_threads import default_threads  # noqa: E402


def _on_threads(n: int, work) -> float:
    """Run work(i) on n threads at once; the wall time of the slowest."""
    barrier = threading.Barrier(n + 1)
    done = []

    def run(i: int) -> None:
        barrier.wait()
        work(i)
        done.append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return max(done) - start


def bandwidth(gib: float, threads: int, repeats: int) -> dict[str, float]:
    """GB/s (10^9 bytes) of read, copy and triad over `gib` GiB per array, split over `threads`."""
    n = int(gib * 2**30 / 8)
    a, b, c = np.ones(n), np.full(n, 2.0), np.full(n, 0.5)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    sink = [0.0] * threads

    def read(i: int) -> None:
        lo, hi = bounds[i]
        sink[i] = float(a[lo:hi].max())  # a vectorized reduction that keeps up with memory (sum's does not)

    def copy(i: int) -> None:
        lo, hi = bounds[i]
        np.copyto(b[lo:hi], a[lo:hi])

    def triad(i: int) -> None:
        lo, hi = bounds[i]
        np.multiply(c[lo:hi], 3.0, out=a[lo:hi])
        np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

    # bytes moved per run, as STREAM counts them (triad here makes two passes: 5 arrays' worth)
    kernels = {"read": (read, 8 * n), "copy": (copy, 16 * n), "triad": (triad, 40 * n)}
    out = {}
    for name, (work, nbytes) in kernels.items():
        best = min(_on_threads(threads, work) for _ in range(repeats))
        out[name] = nbytes / best / 1e9
    return out


def bytes_per_token(path: Path) -> dict[str, int]:
    """Bytes of weights a one-token decode reads: every tensor but the token embedding (one row of
    it), which is read whole when it is also the output layer (no `output.weight`)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    tied = "output.weight" not in sizes
    embd = sizes.get("token_embd.weight", 0)
    weights = sum(sizes.values()) - (0 if tied else embd)
    return {"weights_read": weights, "file_tensors": sum(sizes.values()), "tied_output": tied}


def decode_speed(path: Path, threads: int, tokens: int) -> float:
    """Tokens/s of one greedy stream after its first token (the engine, in this process)."""
    from edge_llm.api import load
    from edge_llm.sampling import SamplingParams

    engine = load(str(path), n_ctx=2048, n_parallel=1, n_threads=threads, adapt_threads=False, spec="off")
    try:
        prompt = engine.tokenize("Write a long, detailed story about the sea.")
        params = SamplingParams.create(temperature=0, max_tokens=tokens, ignore_eos=True)
        list(engine.stream(prompt, SamplingParams.create(temperature=0, max_tokens=4)))  # warm up
        best = 0.0
        for _ in range(2):
            first = None
            n = 0
            for delta in engine.stream(prompt, params):
                n += len(delta.token_ids)
                if first is None:
                    first, n = time.perf_counter(), 0
            best = max(best, n / (time.perf_counter() - first))
        return best
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="llama3.2-1b", help="a .gguf or benchmark model name")
    parser.add_argument("-t", "--threads", type=int, default=default_threads())
    parser.add_argument("--gib", type=float, default=1.0, help="size of each bandwidth array (GiB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    path = resolve_model(args.model)
    bw = bandwidth(args.gib, args.threads, args.repeats)
    size = bytes_per_token(path)
    speed = decode_speed(path, args.threads, args.tokens)
    ceiling = bw["read"] * 1e9 / size["weights_read"]
    print(f"memory bandwidth, {args.threads} threads: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f}, "
          f"triad {bw['triad']:.1f}")
    print(f"{path.name}: {size['weights_read'] / 1e6:.0f} MB of weights read per token "
          f"({'output tied to the embedding' if size['tied_output'] else 'embedding: one row'})")
    print(f"decode {speed:.1f} tokens/s single stream, -t {args.threads}; read bandwidth allows {ceiling:.1f}: "
          f"{speed / ceiling:.2f} of the roofline (goal >= 0.8)")
    print(json.dumps({"bench": "roofline", "model": str(path), "threads": args.threads, "bandwidth_gbs": bw,
                      "bytes_per_token": size, "decode_tokens_per_s": speed, "roofline_tokens_per_s": ceiling,
                      "fraction": speed / ceiling}))


if __name__ == "__main__":
    main()
