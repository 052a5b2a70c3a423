"""`edge-llm convert`: every architecture against transformers' forward pass, tokenizers against the
HF tokenizers, the real SmolLM2 weights, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from llama_cpp_reference import gguf_differences, llama_cpp_dir, reference_gguf
from tiny_models import (
    FAMILIES,
    MIXED_TEXT,
    build_baichuan,
    build_llama,
    build_qwen2,
    build_tokenizers,
    llama_cpp_logits,
    llama_cpp_tokenize,
    reference_logits,
    train_sentencepiece,
)

from edge_llm.convert import convert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory, demo_path):
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"), demo_path)


@pytest.fixture(scope="session")
def tiny_family(tokenizers_dir, tmp_path_factory):
    """Each family's tiny checkpoint, built once per session (both tests below read it, neither
    changes it)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = FAMILIES[name].build(tmp_path_factory.mktemp(name) / name, tokenizers_dir)
        return built[name]

    return get


def _field(path, key):
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_same_gguf_as_llama_cpp_converter(arch, tiny_family, tmp_path):
    """Every tensor (name, type, shape, bytes) and every metadata key llama.cpp reads, against the
    converter of the llama.cpp that llama-cpp-python vendors (tests/llama_cpp_reference.py). The
    fixtures' trained tokenizers have no known pre-tokenizer hash, so llama.cpp's converter is told
    the family's `pre` when its hash table does not know it; edge-llm finds it by itself."""
    family = FAMILIES[arch]
    tiny = tiny_family(arch)
    ours = convert(tiny.path, tmp_path / "ours.gguf", outtype="f16")
    reference = reference_gguf(tiny.path, "f16", pre=family.pre, patch=family.upstream_patch)
    assert gguf_differences(reference, ours) == {key: what for key, (what, _why) in family.differences.items()}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_architecture_matches_transformers(arch, tiny_family, tmp_path):
    tiny = tiny_family(arch)
    ids = tiny.tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    ref = reference_logits(tiny.reference, ids)
    scale = float(np.abs(ref).max())

    f32 = convert(tiny.path, tmp_path / "f32.gguf", outtype="f32")
    assert llama_cpp_tokenize(f32, MIXED_TEXT) == ids  # llama.cpp tokenizes exactly like the HF tokenizer
    assert _field(f32, "tokenizer.ggml.pre") == FAMILIES[arch].pre
    got = llama_cpp_logits(f32, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 1e-3 * scale

    # Lower precision: random tiny models have near-ties everywhere, so top-1 agreement says little
    # there (the real-weights test checks it); the logits as a whole must stay close.
    for outtype, quant, min_cos in (("f16", None, 0.999), ("q8_0", None, 0.99), ("f16", "q4_k_m", 0.85)):
        path = convert(tiny.path, tmp_path / f"{quant or outtype}.gguf", outtype=outtype, quant=quant)
        got = llama_cpp_logits(path, ids)
        cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cos.mean() > min_cos, (quant or outtype, cos.mean())
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["f16.gguf", "f32.gguf", "q4_k_m.gguf", "q8_0.gguf"]
    assert not list(tmp_path.glob(".*"))  # no temporary or intermediate file left


def test_pre_tokenizer_hashes_are_llama_cpps():
    """Every pre-tokenizer hash edge-llm knows names what llama.cpp's converter names it."""
    import re

    from edge_llm.convert.vocab import KNOWN_PRE_HASHES

    source = (llama_cpp_dir() / "conversion" / "base.py").read_text(encoding="utf-8")
    upstream: dict[str, str] = {}
    for digest, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#.*\n)*\s*res = "([^"]+)"', source):
        upstream[digest] = name  # later ifs win, as in upstream's chain of ifs
    assert len(upstream) > 80
    assert {h: upstream.get(h) for h in KNOWN_PRE_HASHES} == KNOWN_PRE_HASHES


def test_internlm2_chat_model_ends_turns_with_im_end(tiny_family, tmp_path):
    """An InternLM2 chat model's eos is <|im_end|> (as llama.cpp's converter writes it), not the
    SentencePiece </s> a chat turn never produces."""
    tiny = tiny_family("internlm2-chat")
    added = json.loads((tiny.path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    im_end = next(int(tid) for tid, data in added.items() if data["content"] == "<|im_end|>")
    out = convert(tiny.path, tmp_path / "m.gguf", outtype="f16")
    assert json.loads((tiny.path / "config.json").read_text())["eos_token_id"] == 2
    assert _field(out, "tokenizer.ggml.eos_token_id") == im_end
    assert _field(out, "tokenizer.ggml.tokens")[im_end] == "<|im_end|>"


def test_gemma3_hub_config_leaves_defaults_out(tiny_family, tmp_path):
    """Gemma3ForConditionalGeneration's text_config on the hub leaves most values to transformers'
    Gemma3TextConfig defaults and gives RoPE as the old `rope_scaling` (google/gemma-3-4b-it:
    linear, factor 8). llama.cpp's converter reads the config through transformers, which fills them
    in; edge-llm, without transformers, must write the same keys from its own table."""
    import shutil

    import transformers
    from gguf import GGUFReader

    tiny = tiny_family("gemma3-multimodal")
    hub, filled = tmp_path / "hub", tmp_path / "filled"
    shutil.copytree(tiny.path, hub)
    config = json.loads((hub / "config.json").read_text())
    defaults = transformers.Gemma3TextConfig().to_dict()
    text = {k: v for k, v in config["text_config"].items() if k != "rope_parameters" and defaults.get(k, k) != v}
    assert {"rms_norm_eps", "final_logit_softcapping", "attn_logit_softcapping", "rope_theta"}.isdisjoint(text)
    text["rope_scaling"] = {"factor": 8.0, "rope_type": "linear"}
    (hub / "config.json").write_text(json.dumps({**config, "text_config": text}))
    shutil.copytree(hub, filled)
    full = transformers.AutoConfig.from_pretrained(hub).to_dict()  # what llama.cpp's converter reads
    assert full["text_config"]["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    (filled / "config.json").write_text(json.dumps(full))

    def keys(path):
        return {f.name: f.contents() for f in GGUFReader(path).fields.values()
                if not f.name.startswith(("GGUF.", "general.", "edge_llm."))}

    ours = keys(convert(hub, tmp_path / "hub.gguf", outtype="f16"))
    assert ours == keys(convert(filled, tmp_path / "filled.gguf", outtype="f16"))
    assert ours["gemma3.rope.freq_base"] == 1e6 and ours["gemma3.rope.freq_base_swa"] == 1e4
    assert ours["gemma3.rope.scaling.type"] == "linear" and ours["gemma3.rope.scaling.factor"] == 8.0
    assert ours["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)


def test_experts_are_written_expert_by_expert(tiny_family, tmp_path, monkeypatch):
    """Memory stays bounded for MoE checkpoints: a layer's stacked experts are read a few rows at a
    time from the memory-mapped files, never stacked whole, and the bytes are the same."""
    from edge_llm.convert import base
    from edge_llm.convert.checkpoint import Lazy

    tiny = tiny_family("qwen3-moe")
    whole = convert(tiny.path, tmp_path / "whole.gguf", outtype="q8_0")
    monkeypatch.setattr(base, "_BLOCK_BYTES", 4096)
    loaded, real_load = [], Lazy.load
    monkeypatch.setattr(Lazy, "load", lambda self: loaded.append(self.shape) or real_load(self))
    streamed = convert(tiny.path, tmp_path / "streamed.gguf", outtype="q8_0")
    assert loaded and not [shape for shape in loaded if len(shape) == 3]
    assert streamed.read_bytes() == whole.read_bytes()


def test_sentencepiece_without_dummy_prefix(tmp_path):
    """Baichuan2 and InternLM2 train SentencePiece without the dummy "▁" prefix; their own tokenizers
    are SentencePiece itself, so llama.cpp must tokenize exactly as SentencePiece does."""
    import sentencepiece

    spm_dir = train_sentencepiece(tmp_path / "spm", add_dummy_prefix=False)
    tiny = build_llama(tmp_path / "llama", spm_dir)
    out = convert(tiny.path, tmp_path / "m.gguf", outtype="f32")
    assert _field(out, "tokenizer.ggml.add_space_prefix") is False
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    for text in (MIXED_TEXT, "x", " leading space", "\n\nnewlines"):
        assert llama_cpp_tokenize(out, text) == sp.encode(text), text


def test_baichuan2_head_is_normalized_and_baichuan1_is_not(tokenizers_dir, tmp_path):
    """llama.cpp's own converter leaves Baichuan2's NormHead weights raw; ours normalizes them."""
    from gguf import GGUFReader

    for version in (1, 2):
        tiny = build_baichuan(tmp_path / f"v{version}", tokenizers_dir / "spm", version=version)
        out = convert(tiny.path, tmp_path / f"v{version}.gguf", outtype="f32")
        head = next(t for t in GGUFReader(out).tensors if t.name == "output.weight")
        norms = np.linalg.norm(np.asarray(head.data), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5) == (version == 2)


def test_sharded_bf16_checkpoint(tokenizers_dir, tmp_path):
    """bfloat16 weights in several shards with an index, as most hub checkpoints come."""
    import torch
    import transformers

    tiny = build_llama(tmp_path / "fp32", tokenizers_dir / "spm")
    sharded = tmp_path / "bf16-sharded"
    tiny.reference.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="100KB")
    tiny.tokenizer.save_pretrained(sharded)
    (sharded / "tokenizer.model").write_bytes((tiny.path / "tokenizer.model").read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    # The bf16 weights widened to float32 (loaded fresh, so the RoPE frequencies stay float32).
    reference = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    ids = tiny.tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    ref = reference_logits(reference, ids)
    got = llama_cpp_logits(convert(sharded, tmp_path / "out.gguf", outtype="f32"), ids)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    bf16 = convert(sharded, tmp_path / "out-bf16.gguf", outtype="bf16")
    assert _field(bf16, "general.file_type") == 32  # MOSTLY_BF16: the bf16 weights kept as they are
    got = llama_cpp_logits(bf16, ids)  # llama.cpp's bf16 matmuls round the activations to bf16 too
    assert (np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))).min() > 0.999


@pytest.mark.model
def test_real_weights_smollm2_round_trip(smollm2_hf_dir, tmp_path):
    """The bundled SmolLM2 GGUF rebuilt as an HF checkpoint by transformers, converted back by the CLI."""
    import torch
    import transformers

    out = run_cli("convert", str(smollm2_hf_dir), "-o", str(tmp_path / "smol-f32.gguf"), "--outtype", "f32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "smol-f32.gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert llama_cpp_tokenize(tmp_path / "smol-f32.gguf", MIXED_TEXT) == ids
    ref = reference_logits(model, ids)
    got = llama_cpp_logits(tmp_path / "smol-f32.gguf", ids)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()

    out = run_cli("convert", str(smollm2_hf_dir), "-o", str(tmp_path / "smol-q5_k_m.gguf"), "--quant", "q5_k_m")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # quiet: no llama.cpp log, no progress line when not a terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-f32.gguf", "smol-q5_k_m.gguf"]
    got = llama_cpp_logits(tmp_path / "smol-q5_k_m.gguf", ids)
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.7  # measured: 0.775 (5-bit on a 135M model)
    assert cos.mean() > 0.95
    assert _field(tmp_path / "smol-q5_k_m.gguf", "general.file_type") == 17  # MOSTLY_Q5_K_M
    assert _field(tmp_path / "smol-q5_k_m.gguf", "edge_llm.quant") == "q5_k_m"
    assert _field(tmp_path / "smol-q5_k_m.gguf", "edge_llm.converter").startswith("edge-llm ")
    assert _field(tmp_path / "smol-q5_k_m.gguf", "tokenizer.chat_template")


@pytest.mark.model
def test_same_file_as_llama_cpp_converter(smollm2_hf_dir, demo_path, tmp_path):
    """The bundled GGUF was made by llama.cpp's converter and quantizer. Its weights rebuilt as an HF
    checkpoint, converted by us and quantized to its Q4_1 by llama.cpp, give back every tensor byte
    for byte, and the same vocabulary, merges, special tokens, template and hyperparameters."""
    from gguf import GGUFReader

    from edge_llm.quantize import quantize_file

    f32 = convert(smollm2_hf_dir, tmp_path / "f32.gguf", outtype="f32")
    upstream, mine = GGUFReader(demo_path), GGUFReader(quantize_file(f32, tmp_path / "q4_1.gguf", "q4_1"))
    theirs = {t.name: t for t in upstream.tensors}
    # Same tensor order as llama.cpp's converter (today's llama-quantize regroups them by layer).
    assert [t.name for t in GGUFReader(f32).tensors] == list(theirs)
    assert sorted(t.name for t in mine.tensors) == sorted(theirs)
    for t in mine.tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name

    def fields(reader):
        return {f.name: f.contents() for f in reader.fields.values()
                if not f.name.startswith(("GGUF.", "general.", "edge_llm."))}

    # Not in the rebuilt checkpoint's files (transformers writes head_dim into config.json and drops
    # add_bos_token / add_prefix_space from the tokenizer config), so not expected to match.
    expected_differences = {"llama.attention.key_length", "llama.attention.value_length",
                            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"}
    a, b = fields(upstream), fields(mine)
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= expected_differences
    assert a["tokenizer.ggml.pre"] == b["tokenizer.ggml.pre"] == "smollm"
    assert len(b["tokenizer.ggml.merges"]) > 40000


def test_pytorch_bin_checkpoint(tokenizers_dir, tmp_path):
    """A pickle checkpoint (pytorch_model.bin): read with torch, weights_only=True."""
    import torch

    tiny = build_llama(tmp_path / "llama", tokenizers_dir / "spm")
    state = {k: v.to(torch.bfloat16) for k, v in tiny.reference.state_dict().items()}
    torch.save(state, tiny.path / "pytorch_model.bin")
    (tiny.path / "model.safetensors").unlink()
    ids = tiny.tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    ref = reference_logits(tiny.reference, ids)
    got = llama_cpp_logits(convert(tiny.path, tmp_path / "bin.gguf", outtype="f32"), ids)
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.999  # bf16-rounded weights, else the same model


def test_conversion_never_imports_torch(tokenizers_dir, tmp_path):
    tiny = build_qwen2(tmp_path / "qwen2", tokenizers_dir / "qwen2-bpe")
    code = ("import sys; from edge_llm.convert import convert; "
            f"convert({str(tiny.path)!r}, {str(tmp_path / 'o.gguf')!r}, 'q8_0'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_metadata(tokenizers_dir, tmp_path):
    tiny = build_qwen2(tmp_path / "Qwen2-Tiny-Instruct", tokenizers_dir / "qwen2-bpe")
    (tiny.path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Qwen2 tiny\n")
    out = convert(tiny.path, tmp_path / "o.gguf", outtype="f16")
    assert _field(out, "general.architecture") == "qwen2"
    assert "Qwen2" in _field(out, "general.name")
    assert _field(out, "general.license") == "apache-2.0"
    assert _field(out, "edge_llm.quant") == "f16"
    assert _field(out, "general.file_type") == 1


# --- bad inputs: one line, exit 1, nothing left behind ------------------------------------------------

def _assert_one_line_error(out, fragment, folder):
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert fragment in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert not [p.name for p in folder.iterdir()], "an output or temporary file was left behind"


@pytest.fixture()
def tiny_llama(tokenizers_dir, tmp_path):
    return build_llama(tmp_path / "llama", tokenizers_dir / "spm")


@pytest.mark.parametrize("damage,fragment", [
    ("no_config", "no config.json"),
    ("truncated", "is truncated"),
    ("shape", "but config.json implies [64, 256]: the weights do not match the config"),
    ("unknown_arch", "unsupported architecture GPTBigCodeForCausalLM; supported: BaiChuanForCausalLM"),
    ("missing_shard", "missing"),
    ("not_safetensors", "not a valid safetensors file"),
])
def test_bad_checkpoints(damage, fragment, tiny_llama, tmp_path):
    folder = tiny_llama.path
    config = json.loads((folder / "config.json").read_text())
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "shape":
        config["intermediate_size"] = 256
    elif damage == "unknown_arch":
        config["architectures"] = ["GPTBigCodeForCausalLM"]
    elif damage == "missing_shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
        (folder / "model.safetensors").unlink()
    elif damage == "not_safetensors":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" * 4)
    if damage != "no_config":
        (folder / "config.json").write_text(json.dumps(config))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_one_line_error(run_cli("convert", str(folder), "-o", str(out_dir / "m.gguf")), fragment, out_dir)


def test_bad_arguments(tiny_llama, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_one_line_error(run_cli("convert", str(tmp_path / "nowhere")), "not a folder", out_dir)
    _assert_one_line_error(run_cli("convert", str(tiny_llama.path), "-o", str(out_dir / "m.gguf"), "--quant",
                                   "q9_k"), "unknown quant type 'q9_k'", out_dir)
    _assert_one_line_error(run_cli("convert", str(tiny_llama.path), "-o", str(tmp_path / "no" / "m.gguf")),
                           "output folder does not exist", out_dir)


def test_disk_full_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    """Both ways a disk fills: known before writing (free space check) and mid-write (ENOSPC)."""
    import errno

    from edge_llm.convert import base
    from edge_llm.errors import EdgeLLMError

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(base, "disk_free", lambda path: 1000)
    with pytest.raises(EdgeLLMError, match="not enough disk space"):
        convert(tiny_llama.path, out_dir / "m.gguf")
    assert not list(out_dir.iterdir())
    monkeypatch.undo()

    calls = []
    real_write = base.StreamingWriter.write_tensor_blocks

    def write_then_fill(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(base.StreamingWriter, "write_tensor_blocks", write_then_fill)
    with pytest.raises(EdgeLLMError, match="disk full while writing"):
        convert(tiny_llama.path, out_dir / "m.gguf", quant="q4_k_m")
    assert not list(out_dir.iterdir())

    def interrupted(self, tensor, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base.StreamingWriter, "write_tensor_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama.path, out_dir / "m.gguf")
    assert not list(out_dir.iterdir())


def test_existing_output_survives_a_failed_conversion(tiny_llama, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"the previous good file")
    config = json.loads((tiny_llama.path / "config.json").read_text())
    (tiny_llama.path / "config.json").write_text(json.dumps({**config, "intermediate_size": 3}))
    out = run_cli("convert", str(tiny_llama.path), "-o", str(target))
    assert out.returncode == 1
    assert target.read_bytes() == b"the previous good file"
    assert [p.name for p in tmp_path.iterdir() if p.name != "llama"] == ["m.gguf"]


def test_unknown_architecture_falls_back_to_a_llama_cpp_checkout(tokenizers_dir, tmp_path):
    """--llama-cpp DIR runs that checkout's convert_hf_to_gguf.py (here the one llama-cpp-python
    vendors) for architectures this converter does not know (here OLMo 1): llama.cpp's tensors and
    keys, plus edge-llm's own keys, written atomically."""
    import torch
    import transformers

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "bpe")
    folder = tmp_path / "olmo"
    model = transformers.OlmoForCausalLM(transformers.OlmoConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = run_cli("convert", str(folder), "-o", str(out_dir / "m.gguf"), "--outtype", "f32",
                  "--llama-cpp", str(llama_cpp_dir()))
    assert out.returncode == 0, out.stderr
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
    assert gguf_differences(reference_gguf(folder, "f32"), out_dir / "m.gguf") == {}
    assert _field(out_dir / "m.gguf", "edge_llm.converter").startswith("llama.cpp convert_hf_to_gguf.py via edge-llm")
    assert _field(out_dir / "m.gguf", "edge_llm.quant") == "f32"
    ids = tok(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert (llama_cpp_logits(out_dir / "m.gguf", ids).argmax(-1) == reference_logits(model.eval(), ids).argmax(-1)).all()

    failing = run_cli("convert", str(folder), "-o", str(out_dir / "n.gguf"), "--llama-cpp", str(tmp_path / "nowhere"))
    assert failing.returncode == 1 and "no convert_hf_to_gguf.py" in failing.stderr
    without = run_cli("convert", str(folder), "-o", str(out_dir / "n.gguf"))
    assert without.returncode == 1 and "unsupported architecture OlmoForCausalLM" in without.stderr


def test_llama_cpp_fallback_without_torch_names_the_extra(tiny_llama, tmp_path, monkeypatch):
    """llama.cpp's converter imports torch and transformers: without them, one line saying what to
    install, before anything runs."""
    import importlib.util

    from edge_llm.errors import MissingExtraError

    config = json.loads((tiny_llama.path / "config.json").read_text())
    (tiny_llama.path / "config.json").write_text(json.dumps({**config, "architectures": ["FancyForCausalLM"]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"torch \(needed by llama.cpp's converter\).*pip install 'edge-llm\[hf\]'"):
        convert(tiny_llama.path, tmp_path / "m.gguf", llama_cpp_dir=llama_cpp_dir())
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]


def test_models_lists_what_converts_locally(tmp_path):
    """`edge-llm models` says which HF checkpoints `edge-llm convert` handles (architecture from the
    entry, or from the downloaded config.json), for the current small models in the registry."""
    from edge_llm.registry import convertible, load_registry

    specs = load_registry()
    for name in ("qwen3-0.6b-hf", "gemma-3-1b-hf", "gemma-3-4b-hf", "phi-4-mini-hf", "smollm3-3b-hf",
                 "llama-3.2-1b-hf", "chatglm3-6b", "baichuan2-7b"):
        assert convertible(specs[name]) == "yes", name
    assert convertible(specs["yuan2-2b"]) == "no: YuanForCausalLM"
    assert convertible(specs["qwen2-7b"]) == "-"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTBigCodeForCausalLM"]}))
    assert convertible(specs["qwen3-0.6b-hf"], str(tmp_path)) == "no: GPTBigCodeForCausalLM"
    out = run_cli("models")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert "convert" in header.split()
    assert any(r.split()[0] == "phi-4-mini-hf" and " yes " in r for r in rows)
