#!/usr/bin/env python3
"""The benchmark model set: models of the shapes people run, built here with random weights.

Speed depends on a model's shape (vocabulary, width, depth, attention layout, quant), not on its
weights, so the speed benchmarks (bench_serving.py, bench_spec.py) run models of real shapes built
from random-weight transformers checkpoints, converted with edge-llm's own converter and quantized
with llama.cpp's quantizer. The text they generate is meaningless; the speed is real. Nothing is
downloaded and nothing is committed: each model is built once into ~/.cache/edge-llm/bench-models/
(a few minutes for the 1B; it is rebuilt when its recipe changes).

    name            shape of                         vocabulary  quant   file
    smollm2-135m    the bundled SmolLM2-135M (real)        49k   q4_1    (the demo model)
    gemma3-270m     Gemma 3 270M                          262k   q8_0     ~290 MB
    qwen2.5-0.5b    Qwen2.5-0.5B                          152k   q4_k_m   ~400 MB
    llama3.2-1b     Llama 3.2 1B (memory-bound)           128k   q4_k_m   ~800 MB

The tokenizers are small real ones (a SentencePiece model trained here for Gemma, SmolLM2's
byte-level BPE for the others, each with its family's split regex and chat template) padded to
the real vocabulary size with made-up word pieces, so every token the model can emit has text
and the output layer, the logits and the samplers are full size.

    python scripts/bench_models.py [NAME ...]      # build (or find) them; prints the paths
    bench_serving.py -m gemma3-270m ...            # any bench script takes these names for -m
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tokenizer fixtures live with the converter tests

# Random weights, drawn wider than transformers' default (0.02), and an output layer of its own
# (real Gemma 3 270M, Qwen2.5-0.5B and Llama 3.2 1B tie it to the embedding): with random tied
# weights the last hidden state stays close to the input token's own embedding, so greedy
# decoding repeats one token forever (measured: 1 distinct token of 48 on the Gemma shape, 38 of
# 48 untied), which no real model does and speculation would "predict" perfectly. Untied, a
# decode reads the same bytes (the output matrix has the embedding's shape) and the file is
# larger by that matrix.
INIT_RANGE = 0.08


@dataclass(frozen=True)
class BenchModel:
    name: str
    shape: str  # what it stands for
    quant: str
    build: Callable[[Path, Path], None] | None  # (checkpoint folder, scratch) -> None; None: the demo model


def _word_pieces(n: int, taken: set[str], prefix: str, seed: int) -> list[str]:
    """`n` made-up word pieces not in `taken`: lowercase letters, about two thirds of them
    starting a word (`prefix`: the tokenizer's space marker)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        piece = "".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
        if rng.random() < 0.67:
            piece = prefix + piece
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def padded_bpe_tokenizer(folder: Path, scratch: Path, regex: str, vocab_size: int, chat_template: str) -> None:
    """SmolLM2's byte-level BPE (49k) with `regex`, padded with made-up pieces to `vocab_size`
    entries (no merges lead to them: prompts tokenize as before, and each can still be output)."""
    import transformers
    from tiny_models import copy_bpe_tokenizer

    from edge_llm.registry import demo_model_path

    demo = demo_model_path()
    smol = transformers.AutoTokenizer.from_pretrained(demo.parent, gguf_file=demo.name)
    smol.save_pretrained(scratch / "smol")
    copy_bpe_tokenizer(scratch / "smol", folder, regex)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    used = len(vocab) + sum(1 for t in data.get("added_tokens", []) if t["content"] not in vocab)
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    for i, piece in enumerate(_word_pieces(vocab_size - used, set(vocab), "\u0120", seed=vocab_size)):
        vocab[piece] = next_id + i
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def padded_gemma_tokenizer(folder: Path, vocab_size: int) -> None:
    """A SentencePiece model laid out like Gemma's (tests/tiny_models.py), its piece list padded
    with made-up pieces to `vocab_size` (scored below every trained piece)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    from tiny_models import train_gemma_tokenizer

    train_gemma_tokenizer(folder)
    proto = spm_pb.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    lowest = min(p.score for p in proto.pieces)
    taken = {p.piece for p in proto.pieces}
    for i, piece in enumerate(_word_pieces(vocab_size - len(proto.pieces), taken, "\u2581", seed=vocab_size)):
        proto.pieces.add(piece=piece, score=lowest - 1.0 - i * 1e-3, type=spm_pb.ModelProto.SentencePiece.NORMAL)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    for name in ("tokenizer.json", "special_tokens_map.json"):  # transformers' copies of the small one
        (folder / name).unlink(missing_ok=True)


def _save_random(model_class, config, folder: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)


def build_gemma3_270m(folder: Path, scratch: Path) -> None:
    import transformers

    padded_gemma_tokenizer(folder, 262144)
    config = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, initializer_range=INIT_RANGE)
    _save_random(transformers.Gemma3ForCausalLM, config, folder)


def build_qwen25_05b(folder: Path, scratch: Path) -> None:
    import transformers
    from tiny_models import CHATML_TEMPLATE, QWEN2_REGEX

    padded_bpe_tokenizer(folder, scratch, QWEN2_REGEX, 151665, CHATML_TEMPLATE)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, initializer_range=INIT_RANGE)
    _save_random(transformers.Qwen2ForCausalLM, config, folder)


def build_llama32_1b(folder: Path, scratch: Path) -> None:
    import transformers
    from tiny_models import CHATML_TEMPLATE, LLAMA3_REGEX

    padded_bpe_tokenizer(folder, scratch, LLAMA3_REGEX, 128256, CHATML_TEMPLATE)
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=INIT_RANGE)
    _save_random(transformers.LlamaForCausalLM, config, folder)


MODELS = {m.name: m for m in (
    BenchModel("smollm2-135m", "the bundled SmolLM2-135M-Instruct", "q4_1", None),
    BenchModel("gemma3-270m", "Gemma 3 270M (262k vocabulary)", "q8_0", build_gemma3_270m),
    BenchModel("qwen2.5-0.5b", "Qwen2.5-0.5B (152k vocabulary)", "q4_k_m", build_qwen25_05b),
    BenchModel("llama3.2-1b", "Llama 3.2 1B (128k vocabulary, memory-bound)", "q4_k_m", build_llama32_1b),
)}


def models_dir() -> Path:
    from bench_servers import cache_dir

    return cache_dir() / "bench-models"


def model_path(name: str) -> Path:
    """The GGUF of a benchmark model, built first if it is not in the cache."""
    from edge_llm.registry import demo_model_path

    model = MODELS[name]
    if model.build is None:
        return demo_model_path()
    recipe = f"{model.name}/{model.quant}/{INIT_RANGE}/{inspect.getsource(model.build)}"
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:8]  # a changed recipe is a new file
    path = models_dir() / f"{name}-{model.quant}-{tag}.gguf"
    if path.is_file():
        return path
    from edge_llm.convert import convert

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the benchmark model {name} ({model.shape}, random weights, {model.quant}) once...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        checkpoint, scratch = Path(tmp) / "checkpoint", Path(tmp) / "scratch"
        checkpoint.mkdir()
        scratch.mkdir()
        model.build(checkpoint, scratch)
        shutil.rmtree(scratch)
        convert(checkpoint, path, outtype="f16", quant=model.quant)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"of {', '.join(MODELS)} (default: all)")
    args = parser.parse_args()
    for name in args.names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")
        print(f"{name}\t{model_path(name)}")


if __name__ == "__main__":
    main()
