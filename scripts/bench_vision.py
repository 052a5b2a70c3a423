"""Images (#29): edge-llm against llama-server on the same model, projector and images, each server
in its own process with a clean environment (bench_servers.py), taking turns round by round.

Measured, per server:
  - ttft_s: time to the first token of one chat request with one image (a new image each time,
    so neither server has it cached): decoding, the vision tower, the image's embeddings, the prompt;
  - text_tps_alone: the aggregate rate (all their tokens over the wall time) of TEXT_CLIENTS text
    streams running together, alone (the sum of per-stream rates after each one's first token is in
    the JSON too: it favours a server that gives every stream its first token late, together);
  - text_tps_with_images: the same streams while image requests arrive one after another;
  - text_kept: with_images / alone, the share of their speed the text clients keep.
Goals: ttft ratio (edge-llm / llama-server) <= 1.0, and text_kept no lower than llama-server's.

The model: real vision weights cannot be downloaded here, so the default is a random-weight
checkpoint of Qwen2-VL's shape at the size of the small vision models people run on a CPU (a
12-layer, 768-wide ViT with 14-pixel patches and a 2x2 merger: 256 image tokens for a 448x448
image; a 24-layer, 512-wide language model), built with transformers and converted by llama.cpp's
own converter (text GGUF and --mmproj) into ~/.cache/edge-llm/bench-vision/. Timing depends on the
shapes, not the weights' values. --model / --mmproj run real files instead.

    python scripts/bench_vision.py --llama-server /path/to/llama-server
    python scripts/bench_vision.py --model m.gguf --mmproj mmproj.gguf --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import (  # noqa: E402
    ROOT,
    ServerSpec,
    cache_dir,
    edge_llm_spec,
    llama_server_binary,
    llama_server_spec,
    parse_checkout,
    running,
    stream_completion,
    turn_order,
)

TEXT_CLIENTS = 4
IMAGE_SIDE = 448


# -- the benchmark model ------------------------------------------------------------------------------


def bench_model() -> tuple[Path, Path]:
    """The default model: a random-weight Qwen2-VL-shaped checkpoint, converted by llama.cpp."""
    folder = cache_dir() / "bench-vision"
    text, mmproj = folder / "qwen2vl-bench-f16.gguf", folder / "mmproj-qwen2vl-bench-f16.gguf"
    if text.is_file() and mmproj.is_file():
        return text, mmproj
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import transformers
    from llama_cpp_reference import _RUNNER, llama_cpp_dir
    from tiny_models import CHATML_TEMPLATE, QWEN2_REGEX, family_bpe_tokenizer

    from edge_llm.registry import demo_model_path

    checkpoint = folder / "hf"
    demo = demo_model_path()
    smol = transformers.AutoTokenizer.from_pretrained(demo.parent, gguf_file=demo.name)
    smol.save_pretrained(folder / "bpe")
    special = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
               "<|endoftext|>")
    family_bpe_tokenizer(folder / "bpe", folder / "tok", QWEN2_REGEX, special,
                         {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                          "chat_template": CHATML_TEMPLATE})
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder / "tok")
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1e6),
        vision_config=dict(depth=12, embed_dim=768, hidden_size=512, num_heads=12, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"])
    model = transformers.Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 401408, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    vendored = llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendored / "gguf-py"), str(vendored)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for out, extra in ((text, []), (mmproj, ["--mmproj"])):
        subprocess.run([sys.executable, "-c", _RUNNER, str(vendored / "convert_hf_to_gguf.py"), "qwen2", "",
                        str(checkpoint), *extra, "--outfile", str(out), "--outtype", "f16"],
                       check=True, env=env, cwd=vendored, capture_output=True)
    return text, mmproj


def image_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_body(seed: int, max_tokens: int) -> dict:
    return {"temperature": 0.0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(seed)}}, {"type": "text", "text": "Describe it."}]}]}


def text_body(i: int, max_tokens: int) -> dict:
    return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Story {i}: write a long story about the sea."}]}


# -- the measurements ---------------------------------------------------------------------------------


async def measure(url: str, seed: int, *, ttft_reps: int, text_tokens: int) -> dict:
    # A new connection per request: a kept-alive one that the server closes as it idles (llama-server
    # after 5 s) fails the next request sent on it ("disconnected without sending a response").
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        # warm both paths (the first image pays for graph allocation on either server)
        await stream_completion(client, "/v1/chat/completions", image_body(seed, 2))
        ttfts = [(await stream_completion(client, "/v1/chat/completions", image_body(seed + 1 + i, 2))).ttft
                 for i in range(ttft_reps)]
        start = time.perf_counter()
        alone = await asyncio.gather(*(stream_completion(client, "/v1/chat/completions", text_body(i, text_tokens))
                                       for i in range(TEXT_CLIENTS)))
        alone_wall = time.perf_counter() - start

        images_done = []

        async def images() -> None:
            await asyncio.sleep(0.5)
            k = 0
            while not text.done():
                start = time.perf_counter()
                await stream_completion(client, "/v1/chat/completions", image_body(seed + 100 + k, 8))
                images_done.append(time.perf_counter() - start)
                k += 1

        async def timed_text() -> tuple[list, float]:
            start = time.perf_counter()
            runs = await asyncio.gather(*(stream_completion(client, "/v1/chat/completions", text_body(10 + i, text_tokens))
                                          for i in range(TEXT_CLIENTS)))
            return runs, time.perf_counter() - start

        text = asyncio.ensure_future(timed_text())
        await asyncio.gather(text, images())
        with_images, with_wall = text.result()
    # The aggregate rate (all tokens over the wall time, as bench_serving.py reports) is the figure;
    # the sum of per-stream rates after each stream's first token is kept beside it.
    aggregate = lambda runs, wall: sum(r.tokens for r in runs) / wall  # noqa: E731
    per_stream = lambda runs: sum(r.decode_tokens_per_s for r in runs)  # noqa: E731
    alone_rate, with_rate = aggregate(alone, alone_wall), aggregate(with_images, with_wall)
    return {"ttft_s": statistics.median(ttfts), "text_tps_alone": alone_rate, "text_tps_with_images": with_rate,
            "text_kept": with_rate / alone_rate, "image_requests_during": len(images_done),
            "per_stream_tps_alone": per_stream(alone), "per_stream_tps_with_images": per_stream(with_images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="text GGUF (default: the random-weight bench model)")
    parser.add_argument("--mmproj", help="its projector GGUF")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: built from the sdist)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttft-reps", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--edge-args", default="", help="extra edge-llm serve flags")
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH[:ARGS]",
                        help="also run edge-llm from another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", default=None, help="write the raw runs here")
    args = parser.parse_args()
    text, mmproj = (Path(args.model), Path(args.mmproj)) if args.model else bench_model()
    parallel = TEXT_CLIENTS + 1
    specs: list[ServerSpec] = [
        edge_llm_spec(text, parallel=parallel, ctx=args.ctx, threads=args.threads,
                      extra_args=("--mmproj", str(mmproj), *args.edge_args.split())),
        llama_server_spec(llama_server_binary(args.llama_server), text, parallel=parallel, ctx=args.ctx,
                          threads=args.threads, extra_args=("--mmproj", str(mmproj))),
    ]
    for text_arg in args.checkout:
        name, path, extra = parse_checkout(text_arg)
        specs.append(edge_llm_spec(text, parallel=parallel, ctx=args.ctx, threads=args.threads, name=name,
                                   extra_args=("--mmproj", str(mmproj), *extra), checkout=path))
    runs = []
    for round_index in range(args.rounds):
        for spec in turn_order(specs, round_index):
            with running(spec) as server:
                result = asyncio.run(measure(server.url, 1000 * (round_index + 1), ttft_reps=args.ttft_reps,
                                             text_tokens=args.text_tokens))
            result.update(server=spec.name, round=round_index, load=os.getloadavg()[0])
            runs.append(result)
            print(json.dumps(result), flush=True)
    table = {}
    for name in (s.name for s in specs):
        mine = [r for r in runs if r["server"] == name]
        table[name] = {k: statistics.median(r[k] for r in mine)
                       for k in ("ttft_s", "text_tps_alone", "text_tps_with_images", "text_kept")}
    edge, ref = table["edge-llm"], table["llama-server"]
    print("\n| server | TTFT, one image (s) | 4 text clients alone (tok/s) | with image requests (tok/s) | kept |")
    print("|---|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['ttft_s']:.2f} | {row['text_tps_alone']:.1f} | {row['text_tps_with_images']:.1f} "
              f"| {row['text_kept']:.2f} |")
    summary = {"ttft_ratio": edge["ttft_s"] / ref["ttft_s"], "text_kept": {n: r["text_kept"] for n, r in table.items()},
               "load": os.getloadavg()}
    print(f"\nTTFT ratio edge-llm / llama-server: {summary['ttft_ratio']:.2f} (goal <= 1.0); text kept: "
          f"edge-llm {edge['text_kept']:.2f}, llama-server {ref['text_kept']:.2f} (goal: not lower)")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "table": table, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
