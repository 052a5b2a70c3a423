"""Tiny random-weight HF checkpoints for the converter tests, built on the fly (no download).

Each builder writes a checkpoint folder the way its family ships it (config.json, safetensors with
the family's own tensor names, a real tokenizer) and returns it with a transformers model that
computes the reference logits. `FAMILIES` (at the end) is the catalogue the tests and
scripts/bench_convert.py run: each family's builder, its pre-tokenizer name, and where edge-llm's
GGUF differs from llama.cpp's converter's on purpose (with the reason).

Baichuan and InternLM2 ship their modelling code with the checkpoint (trust_remote_code), which this
project never runs. Their architectures are Llama's with the attention projections packed in one
tensor (Baichuan's W_pack = [q; k; v], InternLM2's wqkv interleaved per key/value group) and, for
Baichuan2, an lm_head whose rows are L2-normalized at run time (NormHead). So the reference is a
transformers LlamaForCausalLM with random weights; the checkpoint is written from the same weights
packed the original way, and the reference's lm_head is the normalized one Baichuan2 would compute.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from reference_llama import reference_llama

# Mixed English / Chinese / emoji / code, with characters the tiny SentencePiece model never saw
# (byte fallback) and digits.
MIXED_TEXT = ("The quick brown fox jumps over the lazy dog, 12345 times. 我想在apple工作，北京欢迎你！ "
              "Emoji: 🚀😀✅🦙 naïve café ü\ndef square(x):\n    return x ** 2  # code\n\tend")

_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "我想在apple工作 北京 上海 你好世界 欢迎",
    "def f(x):\n    return x ** 2  # code", "Hello, world! 🚀 emojis 😀 and numbers 0123456789",
    "A small model, a short text, and a tokenizer trained in a test fixture.",
]

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2)


@dataclass
class TinyModel:
    path: Path
    reference: object  # a transformers model computing the logits the GGUF must reproduce
    tokenizer: object  # the HF tokenizer


def train_sentencepiece(folder: Path, add_dummy_prefix: bool = True, *, ids=(0, 1, 2, -1),
                        user_defined: tuple[str, ...] = (), tokenizer_config: dict | None = None,
                        vocab_size: int = 600) -> Path:
    """A real (tiny) Llama-style SentencePiece model: BPE with byte fallback, `ids` = (unk, bos, eos,
    pad) ids, no normalization (like Llama's; llama.cpp applies none). `add_dummy_prefix=False` is how
    Baichuan2's, InternLM2's and Gemma's tokenizers are trained; `user_defined` pieces (chat markers)
    are never split."""
    import sentencepiece as spm

    unk, bos, eos, pad = ids
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS * 40), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, unk_id=unk, bos_id=bos, eos_id=eos, pad_id=pad,
        split_digits=True, hard_vocab_limit=False, minloglevel=2, add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=list(user_defined))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    return folder


def copy_bpe_tokenizer(src: Path, folder: Path, regex: str | None = None) -> Path:
    """SmolLM2's real byte-level BPE tokenizer; `regex` swaps in another family's split regex
    (e.g. Qwen2's) so the pre-tokenizer detection and llama.cpp's matching regex get exercised."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    if regex is not None:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def family_bpe_tokenizer(src: Path, folder: Path, regex: str | None, special: tuple[str, ...] = (),
                         config: dict | None = None) -> Path:
    """SmolLM2's byte-level BPE dressed as another family's: that family's split regex, its chat
    special tokens (added, special) and tokenizer_config.json entries (class, bos/eos, template).
    Two tokens swap ids, so that llama.cpp's pre-tokenizer hash cannot take it for SmolLM's (whose
    vocabulary, without multi-digit tokens, tokenizes the hash's test text alike under several
    regexes): the converter must then recognize the family's regex."""
    from tokenizers import AddedToken, Tokenizer

    copy_bpe_tokenizer(src, folder, regex)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    data = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    data.pop("added_tokens_decoder", None)
    data.update(config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


def spm_with_added_tokens(spm_dir: Path, folder: Path, added: dict[str, bool], chat_template: str) -> Path:
    """A Llama-style SentencePiece tokenizer with added tokens after its vocabulary ({text: special})
    and a chat template, saved by transformers (tokenizer.json + tokenizer_config.json) beside it."""
    import transformers
    from tokenizers import AddedToken

    tok = transformers.AutoTokenizer.from_pretrained(spm_dir)
    tok.add_tokens([AddedToken(t, special=sp, normalized=False) for t, sp in added.items()])
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder


class SentencePieceTokenizer:
    """The tokenizer Baichuan's and InternLM2's remote code implement: SentencePiece itself."""

    def __init__(self, folder: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))

    def __len__(self) -> int:
        return self.sp.vocab_size()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + self.sp.encode(text)}


def _hf_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _file_tokenizer(folder: Path):
    """The tokenizer exactly as tokenizer.json has it (AutoTokenizer would rebuild some classes,
    e.g. GPT2Tokenizer, with their default pre-tokenizer)."""
    import transformers

    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def _save_as_shipped(model, tokenizer_dir: Path, folder: Path) -> None:
    """The weights by transformers, the tokenizer files as the family ships them (copied)."""
    model.save_pretrained(folder)
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)


def build_llama(folder: Path, tokenizer_dir: Path, **overrides) -> TinyModel:
    import torch
    import transformers

    torch.manual_seed(0)
    tok = _hf_tokenizer(tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **{**SMALL, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    _save(model, tok, folder)
    for name in ("tokenizer.model",):  # keep the SentencePiece model beside the tokenizer.json
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return TinyModel(folder, model, tok)


def build_mistral(folder: Path, tokenizer_dir: Path) -> TinyModel:
    import torch
    import transformers

    torch.manual_seed(1)
    tok = _hf_tokenizer(tokenizer_dir)
    config = transformers.MistralConfig(vocab_size=len(tok), sliding_window=None, **SMALL)
    model = transformers.MistralForCausalLM(config).eval()
    _save(model, tok, folder)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    return TinyModel(folder, model, tok)


def build_qwen2(folder: Path, tokenizer_dir: Path, tied: bool = True) -> TinyModel:
    import torch
    import transformers

    torch.manual_seed(2)
    tok = _hf_tokenizer(tokenizer_dir)
    config = transformers.Qwen2Config(vocab_size=len(tok), tie_word_embeddings=tied, rope_theta=1_000_000.0,
                                      **SMALL)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    _save(model, tok, folder)
    return TinyModel(folder, model, tok)


def build_qwen3(folder: Path, tokenizer_dir: Path) -> TinyModel:
    import torch
    import transformers

    torch.manual_seed(3)
    tok = _hf_tokenizer(tokenizer_dir)
    config = transformers.Qwen3Config(vocab_size=len(tok), tie_word_embeddings=False, head_dim=32, **SMALL)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # q/k norms are ones at init: make them matter
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    _save(model, tok, folder)
    return TinyModel(folder, model, tok)


GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
                  "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim "
                  "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
                  "{% endif %}")


def train_gemma_tokenizer(folder: Path) -> Path:
    """A SentencePiece model laid out like Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3, turn markers,
    no dummy prefix; its HF tokenizer (GemmaTokenizer) saved beside it with Gemma's chat template."""
    import transformers

    train_sentencepiece(folder / "spm", add_dummy_prefix=False, ids=(3, 2, 1, 0),
                        user_defined=("<start_of_turn>", "<end_of_turn>"),
                        tokenizer_config={"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>",
                                          "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                                          "add_bos_token": True, "add_eos_token": False})
    tok = transformers.AutoTokenizer.from_pretrained(folder / "spm")
    tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(folder)
    shutil.copy(folder / "spm" / "tokenizer.model", folder / "tokenizer.model")
    shutil.rmtree(folder / "spm")
    return folder


def _scramble_norms(model, low: float = -0.5, high: float = 0.5) -> None:
    """Norm weights are constant at init; random ones make a wrong offset or mapping show."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(low, high)


def build_gemma(folder: Path, tokenizer_dir: Path, version: int = 1, multimodal: bool = False) -> TinyModel:
    """Gemma 1/2/3 (Gemma3ForConditionalGeneration with a tiny vision tower when `multimodal`).
    head_dim = query_pre_attn_scalar, as in the real models (llama.cpp scales attention by
    head_dim for the sizes it does not know); a 16-token sliding window so the test text crosses it."""
    import torch
    import transformers

    torch.manual_seed(10 + version)
    tok = _hf_tokenizer(tokenizer_dir)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  initializer_range=0.2, **ids)
    if version == 1:
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
    elif version == 2:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, query_pre_attn_scalar=16, sliding_window=16, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0))
    else:
        text = transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=16, sliding_window=16)
        if multimodal:
            vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14)
            config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                               mm_tokens_per_image=1, **ids)
            model = transformers.Gemma3ForConditionalGeneration(config)
        else:
            model = transformers.Gemma3ForCausalLM(text)
    model.eval()
    _scramble_norms(model)
    _save(model, tok, folder)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    return TinyModel(folder, model, tok)


PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
                 "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def build_phi3(folder: Path, tokenizer_dir: Path, phi4_mini: bool = False) -> TinyModel:
    """Phi-3-mini (MHA, SentencePiece) or Phi-4-mini (GQA, byte-level BPE, 3/4 partial rotary,
    LongRoPE factors, tied embeddings)."""
    import torch
    import transformers

    torch.manual_seed(20 + phi4_mini)
    tok = _file_tokenizer(tokenizer_dir)
    config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  original_max_position_embeddings=256, initializer_range=0.2, pad_token_id=None,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if phi4_mini:
        rotary_half = int(64 // 4 * 0.75) // 2
        # llama.cpp picks the long factors past the original context, counting its whole context,
        # which it rounds up to 256: an original context of 256 keeps both sides on the short ones.
        config.update(num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=256,
                      tie_word_embeddings=True,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                       "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                                       "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)]})
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config)).eval()
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


def build_moe(folder: Path, tokenizer_dir: Path, family: str) -> TinyModel:
    """Mixtral, Qwen2-MoE (with its gated shared expert) or Qwen3-MoE: 4 experts, 2 per token,
    saved one tensor per expert as the hub checkpoints are."""
    import torch
    import transformers

    torch.manual_seed(30 + ["mixtral", "qwen2_moe", "qwen3_moe"].index(family))
    tok = _hf_tokenizer(tokenizer_dir)
    common = dict(vocab_size=len(tok), **{**SMALL, "initializer_range": 0.1}, num_experts_per_tok=2)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4,
                                                                          sliding_window=None))
    elif family == "qwen2_moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            decoder_sparse_step=1, norm_topk_prob=False, rope_theta=1_000_000.0, tie_word_embeddings=False))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, num_experts=4, moe_intermediate_size=32, head_dim=32, decoder_sparse_step=1,
            norm_topk_prob=True, tie_word_embeddings=False))
    model.eval()
    _scramble_norms(model, 0.5, 1.5)
    _save(model, tok, folder)
    if (tokenizer_dir / "tokenizer.model").is_file():
        shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    return TinyModel(folder, model, tok)


GLM_TEMPLATE = ("[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def build_llama_like(folder: Path, tokenizer_dir: Path, family: str, seed: int) -> TinyModel:
    """Families transformers writes with Llama's tensor names plus a twist: SmolLM3 (4 layers, so the
    4th has no RoPE), OLMo 2 (post-norms, whole-projection q/k norms), Granite (multipliers),
    InternLM3."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tok = _file_tokenizer(tokenizer_dir) if not (tokenizer_dir / "tokenizer.model").is_file() \
        else _hf_tokenizer(tokenizer_dir)
    common = dict(vocab_size=len(tok), **SMALL, tie_word_embeddings=False, pad_token_id=None,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "smollm3":
        config = transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4}, no_rope_layer_interval=4)
        model = transformers.SmolLM3ForCausalLM(config)
    elif family == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common, rope_theta=500000.0))
    elif family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **common, attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5,
            logits_scaling=2.5))
    else:  # InternLM3's own modelling code is remote code; its architecture is Llama's
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, head_dim=16))
    model.eval()
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    if family == "internlm3":
        config = json.loads((folder / "config.json").read_text())
        config.update(architectures=["InternLM3ForCausalLM"], model_type="internlm3", bias=False, qkv_bias=False)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return TinyModel(folder, model, tok)


def build_starcoder2(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """StarCoder2: biases everywhere, LayerNorm, GELU MLP (c_fc/c_proj), GQA."""
    import torch
    import transformers

    torch.manual_seed(50)
    tok = _file_tokenizer(tokenizer_dir)
    config = transformers.Starcoder2Config(
        vocab_size=len(tok), **{k: v for k, v in SMALL.items() if k != "rms_norm_eps"}, use_bias=True,
        norm_epsilon=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = transformers.Starcoder2ForCausalLM(config).eval()
    with torch.no_grad():  # biases and LayerNorm shifts are zero at init: make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.3)
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


def build_minicpm(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """MiniCPM (remote code on the hub) in its original layout: Llama's tensors, tied embeddings, and
    scales applied at run time (embeddings x scale_emb, each residual branch x scale_depth/sqrt(L),
    logits / (hidden/dim_model_base)). The reference is a Llama with those scales folded into its
    weights: the same function."""
    import torch

    tok = _hf_tokenizer(tokenizer_dir)
    scale_emb, scale_depth, dim_model_base = 12.0, 1.4, 16
    ref = _reference_llama(tok, seed=51, initializer_range=0.1)
    state = {k: v.detach().float().numpy().copy() for k, v in ref.state_dict().items()}
    del state["lm_head.weight"]  # tied, like MiniCPM-2B
    residual = scale_depth / SMALL["num_hidden_layers"] ** 0.5
    with torch.no_grad():
        embed = ref.model.embed_tokens.weight.clone()
        ref.model.embed_tokens.weight.mul_(scale_emb)
        ref.lm_head.weight.copy_(embed / (SMALL["hidden_size"] / dim_model_base))
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual)
            layer.mlp.down_proj.weight.mul_(residual)
    config = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_act": "silu",
              "vocab_size": len(tok), "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True,
              "scale_emb": scale_emb, "scale_depth": scale_depth, "dim_model_base": dim_model_base,
              "bos_token_id": 1, "eos_token_id": 2,
              **{k: SMALL[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}}
    _write_original(folder, state, config, tokenizer_dir)
    return TinyModel(folder, ref, tok)


def build_ernie45(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """ERNIE 4.5 dense, written with q/k/v fused in `qkv_proj` and gate/up in `up_gate_proj` (as
    Baidu's first PyTorch checkpoints were; transformers' own layout is the plain Llama-like one)."""
    import torch
    import transformers

    torch.manual_seed(52)
    tok = _hf_tokenizer(tokenizer_dir)
    config = transformers.Ernie4_5Config(vocab_size=len(tok), **SMALL, head_dim=16, use_bias=False,
                                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.Ernie4_5ForCausalLM(config).eval()
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    for bid in range(SMALL["num_hidden_layers"]):
        attn, mlp = f"model.layers.{bid}.self_attn", f"model.layers.{bid}.mlp"
        tensors[f"{attn}.qkv_proj.weight"] = np.concatenate([tensors.pop(f"{attn}.{k}_proj.weight") for k in "qkv"])
        tensors[f"{mlp}.up_gate_proj.weight"] = np.concatenate([tensors.pop(f"{mlp}.{k}_proj.weight")
                                                                for k in ("gate", "up")])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return TinyModel(folder, model, tok)


def build_glm(folder: Path, tokenizer_dir: Path, version: str) -> TinyModel:
    """GLM-4-9B-chat as transformers has it (GlmForCausalLM: llama.cpp's CHATGLM) or GLM-4-0414
    (Glm4ForCausalLM: GLM4): q/k/v biases, fused gate/up, RoPE on half of each head."""
    import torch
    import transformers

    torch.manual_seed(60 + (version == "glm4"))
    tok = _file_tokenizer(tokenizer_dir)
    common = dict(vocab_size=len(tok), **SMALL, head_dim=16, attention_bias=True, pad_token_id=None,
                  eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    if version == "glm4":
        model = transformers.Glm4ForCausalLM(transformers.Glm4Config(**common))
    else:
        model = transformers.GlmForCausalLM(transformers.GlmConfig(**common))
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


# ChatGLM3's tokenizer is remote code (tokenization_chatglm.py) that edge-llm never runs; llama.cpp's
# converter loads it through transformers' remote-code loading. For the reference conversion only,
# the fixture folder holds this minimal re-implementation written here (no code from a hub runs);
# edge-llm reads tokenizer.model itself.
_CHATGLM3_TOKENIZER = '''
import sentencepiece
from transformers import PreTrainedTokenizer

SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


class SPTokenizer:
    def __init__(self, path):
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=path)
        self.n_words = self.sp_model.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()
        self.special_tokens = {t: self.n_words + i for i, t in enumerate(SPECIAL)}
        self.index_special_tokens = {i: t for t, i in self.special_tokens.items()}

    def convert_id_to_token(self, index):
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index in [self.eos_id, self.bos_id, self.pad_id] or index < 0 or index > self.sp_model.vocab_size():
            return ""
        return self.sp_model.IdToPiece(index)


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(self, vocab_file, **kwargs):
        self.tokenizer = SPTokenizer(vocab_file)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.tokenizer.n_words + len(SPECIAL)

    def get_vocab(self):
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.sp_model.EncodeAsPieces(text)

    def _convert_token_to_id(self, token):
        return self.tokenizer.special_tokens.get(token, self.tokenizer.sp_model.PieceToId(token))

    def _convert_id_to_token(self, index):
        return self.tokenizer.convert_id_to_token(index)
'''


def build_chatglm3(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """ChatGLM3-6B's layout (ChatGLMModel, remote code on the hub): fused query_key_value with biases,
    fused dense_h_to_4h, multi-query groups, SentencePiece plus nine special tokens. Its architecture
    is the one transformers' GlmForCausalLM implements, so that is the reference, with the weights
    renamed and fused the ChatGLM way."""
    import torch
    import transformers

    torch.manual_seed(62)
    tok = SentencePieceTokenizer(tokenizer_dir)
    vocab = len(tok) + 9
    config = transformers.GlmConfig(vocab_size=vocab, **SMALL, head_dim=16, attention_bias=True, pad_token_id=None,
                                    bos_token_id=None, eos_token_id=2, tie_word_embeddings=False)
    ref = transformers.GlmForCausalLM(config).eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    _scramble_norms(ref, 0.5, 1.5)
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    tensors = {"transformer.embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
               "transformer.encoder.final_layernorm.weight": state["model.norm.weight"],
               "transformer.output_layer.weight": state["lm_head.weight"],
               "transformer.rotary_pos_emb.inv_freq": np.ones(4, dtype=np.float32)}  # skipped by converters
    for bid in range(SMALL["num_hidden_layers"]):
        src, dst = f"model.layers.{bid}", f"transformer.encoder.layers.{bid}"
        for kind in ("weight", "bias"):
            tensors[f"{dst}.self_attention.query_key_value.{kind}"] = np.concatenate(
                [state[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        tensors[f"{dst}.self_attention.dense.weight"] = state[f"{src}.self_attn.o_proj.weight"]
        tensors[f"{dst}.input_layernorm.weight"] = state[f"{src}.input_layernorm.weight"]
        tensors[f"{dst}.post_attention_layernorm.weight"] = state[f"{src}.post_attention_layernorm.weight"]
        tensors[f"{dst}.mlp.dense_h_to_4h.weight"] = state[f"{src}.mlp.gate_up_proj.weight"]
        tensors[f"{dst}.mlp.dense_4h_to_h.weight"] = state[f"{src}.mlp.down_proj.weight"]
    chatglm = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b",
               "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
               "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16,
               "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
               "seq_length": 256, "layernorm_epsilon": SMALL["rms_norm_eps"], "padded_vocab_size": vocab,
               "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
               "original_rope": True, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
    _write_original(folder, tensors, chatglm, tokenizer_dir)
    (folder / "tokenization_chatglm.py").write_text(_CHATGLM3_TOKENIZER)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer",
                                                                              None]},
        "chat_template": GLM_TEMPLATE.replace("<sop>", "sop")}))
    return TinyModel(folder, ref, tok)


def build_deepseek_v2(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """DeepSeek-V2's shape: MLA with q and kv LoRA (ranks 24 and 32; 8 RoPE + 16 plain dims per head),
    a dense first layer, then 4 routed experts (2 per token) and a shared one. (llama.cpp tells the
    LoRA-less V2-Lite by its 27 layers, so a 2-layer fixture must have the q LoRA.)"""
    import torch
    import transformers

    torch.manual_seed(70)
    tok = _file_tokenizer(tokenizer_dir)
    config = transformers.DeepseekV2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=None, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


def build_lfm2(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """LFM2: two short-convolution layers around one attention layer (q/k layer norms)."""
    import torch
    import transformers

    torch.manual_seed(71)
    tok = _file_tokenizer(tokenizer_dir)
    config = transformers.Lfm2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, norm_eps=1e-5, conv_L_cache=3, block_multiple_of=32,
        block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True, full_attn_idxs=[1],
        layer_types=["conv", "full_attention", "conv"], initializer_range=0.2, tie_word_embeddings=True,
        pad_token_id=None, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.Lfm2ForCausalLM(config).eval()
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


def build_gpt_oss(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """gpt-oss with bf16-style (dequantized) experts: 4 experts, 2 per token, attention sinks, a
    16-token sliding window on alternate layers, YaRN RoPE. (gpt-oss's own YaRN has truncate=false,
    which llama.cpp does not implement: it rounds the correction range, and its logits then differ
    from transformers' by up to ~1% on this fixture; the converter is checked with truncate=true.)"""
    import torch
    import transformers

    torch.manual_seed(80)
    tok = _file_tokenizer(tokenizer_dir)
    config = transformers.GptOssConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False, pad_token_id=None,
        bos_token_id=None, eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": True, "original_max_position_embeddings": 256, "rope_theta": 150000.0})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # biases and sinks start at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0, 0.3)
    _scramble_norms(model, 0.5, 1.5)
    _save_as_shipped(model, tokenizer_dir, folder)
    return TinyModel(folder, model, tok)


def _reference_llama(tok, seed: int, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{"vocab_size": len(tok), "tie_word_embeddings": False,
                                         **SMALL, "rope_theta": 10000.0, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def _write_original(folder: Path, tensors: dict[str, np.ndarray], config: dict, tokenizer_dir: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)


def build_baichuan(folder: Path, tokenizer_dir: Path, version: int = 2) -> TinyModel:
    """Baichuan (version 1) or Baichuan2 (NormHead) in their original layout; MHA, like the 7B models.
    32 layers: llama.cpp picks RoPE (7B) or ALiBi (13B, 40 layers) by layer count, so a tiny
    Baichuan must have the 7B's 32 layers to be run as one (with smaller random weights, so that 32
    random layers do not amplify quantization error chaotically)."""
    import torch

    tok = SentencePieceTokenizer(tokenizer_dir)
    ref = _reference_llama(tok, seed=4 + version, num_key_value_heads=SMALL["num_attention_heads"],
                           num_hidden_layers=32, initializer_range=0.1)
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    raw_head = state["lm_head.weight"] * np.linspace(0.5, 3.0, state["lm_head.weight"].shape[0])[:, None]
    tensors = {}
    for name, value in state.items():
        if ".self_attn.q_proj." in name:
            prefix = name.split(".self_attn.")[0]
            tensors[f"{prefix}.self_attn.W_pack.weight"] = np.concatenate(
                [value, state[f"{prefix}.self_attn.k_proj.weight"], state[f"{prefix}.self_attn.v_proj.weight"]])
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        elif name == "lm_head.weight":
            tensors[name] = raw_head.astype(np.float32)
        else:
            tensors[name] = value
    head = torch.from_numpy(raw_head.astype(np.float32))
    with torch.no_grad():  # the reference computes what the original model computes
        ref.lm_head.weight.copy_(torch.nn.functional.normalize(head) if version == 2 else head)
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_act": "silu",
              "hidden_size": SMALL["hidden_size"], "intermediate_size": SMALL["intermediate_size"],
              "num_attention_heads": SMALL["num_attention_heads"], "num_hidden_layers": 32,
              "model_max_length": SMALL["max_position_embeddings"], "rms_norm_eps": SMALL["rms_norm_eps"],
              "vocab_size": len(tok), "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    if version == 2:
        config["z_loss_weight"] = 0
    _write_original(folder, tensors, config, tokenizer_dir)
    return TinyModel(folder, ref, tok)


def internlm2_chat_tokenizer(folder: Path) -> Path:
    """InternLM2-chat's tokenizer shape: the chat markers are pieces of the SentencePiece model itself,
    marked special in tokenizer_config.json; </s> is still the SentencePiece eos (id 2)."""
    import sentencepiece

    markers = ("<|im_start|>", "<|im_end|>")
    train_sentencepiece(folder, add_dummy_prefix=False, user_defined=markers)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(sp.PieceToId(m)): {"content": m, "special": True} for m in markers}
    config["chat_template"] = CHATML_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_internlm2(folder: Path, tokenizer_dir: Path) -> TinyModel:
    """InternLM2 in its original layout: wqkv rows grouped as [kv group][q heads of the group, k, v]."""
    tok = SentencePieceTokenizer(tokenizer_dir)
    ref = _reference_llama(tok, seed=7, rope_theta=1_000_000.0)
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    n_head, n_kv, hidden = SMALL["num_attention_heads"], SMALL["num_key_value_heads"], SMALL["hidden_size"]
    d, q_per_kv = hidden // n_head, n_head // n_kv
    rename = {"model.embed_tokens.weight": "model.tok_embeddings.weight", "lm_head.weight": "output.weight",
              "model.norm.weight": "model.norm.weight"}
    per_layer = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                 "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
                 "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {}
    for name, value in state.items():
        if name in rename:
            tensors[rename[name]] = value
            continue
        prefix, rest = name.split(".", 3)[:3], name.split(".", 3)[3]
        layer = ".".join(prefix)
        module = rest.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            q = value.reshape(n_kv, q_per_kv, d, hidden)
            k = state[f"{layer}.self_attn.k_proj.weight"].reshape(n_kv, 1, d, hidden)
            v = state[f"{layer}.self_attn.v_proj.weight"].reshape(n_kv, 1, d, hidden)
            tensors[f"{layer}.attention.wqkv.weight"] = np.concatenate([q, k, v], axis=1).reshape(-1, hidden)
        elif module in ("self_attn.k_proj", "self_attn.v_proj"):
            continue
        else:
            tensors[f"{layer}.{per_layer[module]}.weight"] = value
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_act": "silu",
              "bias": False, "rope_theta": 1_000_000.0, "rope_scaling": None, "vocab_size": len(tok),
              **{k: SMALL[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                       "rms_norm_eps")},
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    _write_original(folder, tensors, config, tokenizer_dir)
    return TinyModel(folder, ref, tok)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Logits of every position from llama.cpp, with an f32 KV cache so f32 weights stay f32."""
    import llama_cpp

    llm = reference_llama(gguf_path, n_ctx=max(64, len(ids) + 8), n_batch=512, logits_all=True,
                          verbose=False, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_tokenize(gguf_path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()


# --- the fixture catalogue: every family the converter tests (and scripts/bench_convert.py) use -----

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def build_tokenizers(root: Path, demo_path: Path) -> Path:
    """SentencePiece tokenizers trained here (with and without the dummy prefix), SmolLM2's real
    byte-level BPE (from the bundled GGUF), and that BPE dressed as each BPE family's."""
    import transformers

    train_sentencepiece(root / "spm")
    train_sentencepiece(root / "spm-raw", add_dummy_prefix=False)  # Baichuan2 / InternLM2 style
    smol = transformers.AutoTokenizer.from_pretrained(demo_path.parent, gguf_file=demo_path.name)
    smol.save_pretrained(root / "bpe")
    copy_bpe_tokenizer(root / "bpe", root / "qwen2-bpe", QWEN2_REGEX)
    copy_bpe_tokenizer(root / "bpe", root / "llama3-bpe", LLAMA3_REGEX)
    train_gemma_tokenizer(root / "gemma")
    spm_with_added_tokens(root / "spm", root / "phi3", {"<|endoftext|>": True, "<|system|>": True, "<|user|>": True, "<|assistant|>": True,
                                                        "<|end|>": True, "<|placeholder1|>": False}, PHI3_TEMPLATE)
    family_bpe_tokenizer(root / "bpe", root / "phi4-mini", GPT4O_REGEX,
                         ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                         {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                          "eos_token": "<|endoftext|>", "chat_template": PHI3_TEMPLATE})
    family_bpe_tokenizer(root / "bpe", root / "smollm3", LLAMA3_REGEX, ("<|im_start|>", "<|im_end|>"),
                         {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE})
    family_bpe_tokenizer(root / "bpe", root / "olmo2", LLAMA3_REGEX, ("<|pad|>",),
                         {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    family_bpe_tokenizer(root / "bpe", root / "granite", None, ("<|start_of_role|>", "<|end_of_role|>"),
                         {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    spm_with_added_tokens(root / "spm", root / "internlm3", {"<|im_start|>": True, "<|im_end|>": True},
                          CHATML_TEMPLATE)
    family_bpe_tokenizer(root / "bpe", root / "starcoder2", None, (), {"bos_token": "<|endoftext|>",
                                                                       "eos_token": "<|endoftext|>"})
    spm_with_added_tokens(root / "spm", root / "ernie", {"<|begin_of_sentence|>": True, "<|end_of_sentence|>": True},
                          CHATML_TEMPLATE)
    family_bpe_tokenizer(root / "bpe", root / "glm", LLAMA3_REGEX,
                         ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
                         {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": GLM_TEMPLATE})
    internlm2_chat_tokenizer(root / "internlm2-chat")
    family_bpe_tokenizer(root / "bpe", root / "gpt-oss", GPT4O_REGEX,
                         ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"),
                         {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                          "eos_token": "<|return|>"})
    family_bpe_tokenizer(root / "bpe", root / "deepseek", LLAMA3_REGEX, ("<｜begin▁of▁sentence｜>",),
                         {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<|endoftext|>"})
    family_bpe_tokenizer(root / "bpe", root / "lfm2", LLAMA3_REGEX, ("<|startoftext|>",),
                         {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE})
    return root


@dataclass
class Family:
    build: Callable  # (folder, tokenizers_dir) -> TinyModel
    pre: str  # the tokenizer.ggml.pre edge-llm must write (and llama.cpp's converter's fallback, see below)
    # Where edge-llm's file differs from llama.cpp's converter's on purpose: gguf_differences() key ->
    # (the difference, why). Empty: every tensor and every key llama.cpp reads is the same.
    differences: dict = field(default_factory=dict)
    # Python run in llama.cpp's converter's process first, to get past a bug of its own (say which).
    upstream_patch: str = ""


# tokenizer_config.json has "add_prefix_space": null (transformers writes that): llama.cpp's converter
# passes the null on as False, so llama.cpp would not add the SentencePiece prefix space that the
# HF tokenizer adds; edge-llm writes no key, and llama.cpp tokenizes as the HF tokenizer does.
NULL_PREFIX_SPACE = "a null add_prefix_space is no setting: the model's own SentencePiece prefix applies"

# llama.cpp's conversion/baichuan.py passes every tensor but W_pack back to its own modify_tensors
# under the mapped name, which recurses until RecursionError: no Baichuan checkpoint converts. The
# reference is made with that branch calling TextModel.modify_tensors, as the code means to.
BAICHUAN_FIX = """
from conversion import baichuan, base
_unpack = baichuan.BaichuanModel.modify_tensors
def _modify(self, data, name, bid):
    if bid is not None and name == f"model.layers.{bid}.self_attn.W_pack.weight":
        yield from _unpack(self, data, name, bid)
    else:
        yield from base.TextModel.modify_tensors(self, data, name, bid)
baichuan.BaichuanModel.modify_tensors = _modify
"""


FAMILIES = {
    "llama-spm": Family(lambda d, t: build_llama(d, t / "spm"), "default"),
    "llama3-bpe-rope-scaling": Family(lambda d, t: build_llama(d, t / "llama3-bpe", rope_scaling=LLAMA3_ROPE,
                                                               rope_theta=500000.0), "llama-bpe"),
    "smollm-bpe": Family(lambda d, t: build_llama(d, t / "bpe"), "smollm"),
    "mistral": Family(lambda d, t: build_mistral(d, t / "spm"), "default"),
    "qwen2": Family(lambda d, t: build_qwen2(d, t / "qwen2-bpe"), "qwen2"),
    "qwen3": Family(lambda d, t: build_qwen3(d, t / "qwen2-bpe"), "qwen2"),
    "baichuan": Family(lambda d, t: build_baichuan(d, t / "spm", version=1), "default",
                       upstream_patch=BAICHUAN_FIX),
    "baichuan2": Family(lambda d, t: build_baichuan(d, t / "spm-raw", version=2), "default", {
        "tensor output.weight": ("different bytes", "Baichuan2's NormHead normalizes lm_head's rows at run time; "
                                 "llama.cpp's graph does not, so edge-llm writes them normalized"),
        "tokenizer.ggml.add_space_prefix": ("llama.cpp None, edge-llm False", "trained without SentencePiece's "
                                            "dummy prefix: without this key llama.cpp adds a space the original "
                                            "tokenizer does not")},
                        upstream_patch=BAICHUAN_FIX),
    "internlm2": Family(lambda d, t: build_internlm2(d, t / "spm-raw"), "default"),
    "internlm2-chat": Family(lambda d, t: build_internlm2(d, t / "internlm2-chat"), "default"),
    "gemma": Family(lambda d, t: build_gemma(d, t / "gemma", version=1), "default"),
    "gemma2": Family(lambda d, t: build_gemma(d, t / "gemma", version=2), "default"),
    "gemma3": Family(lambda d, t: build_gemma(d, t / "gemma", version=3), "default"),
    "gemma3-multimodal": Family(lambda d, t: build_gemma(d, t / "gemma", version=3, multimodal=True), "default"),
    "phi3": Family(lambda d, t: build_phi3(d, t / "phi3"), "default"),
    "mixtral": Family(lambda d, t: build_moe(d, t / "spm", "mixtral"), "default"),
    "qwen2-moe": Family(lambda d, t: build_moe(d, t / "qwen2-bpe", "qwen2_moe"), "qwen2"),
    "qwen3-moe": Family(lambda d, t: build_moe(d, t / "qwen2-bpe", "qwen3_moe"), "qwen2"),
    "smollm3": Family(lambda d, t: build_llama_like(d, t / "smollm3", "smollm3", 40), "llama-bpe"),
    "olmo2": Family(lambda d, t: build_llama_like(d, t / "olmo2", "olmo2", 41), "llama-bpe"),
    "granite": Family(lambda d, t: build_llama_like(d, t / "granite", "granite", 42), "smollm"),
    "internlm3": Family(lambda d, t: build_llama_like(d, t / "internlm3", "internlm3", 43), "default",
                        {"tokenizer.ggml.add_space_prefix": ("llama.cpp False, edge-llm None", NULL_PREFIX_SPACE)}),
    "minicpm": Family(lambda d, t: build_minicpm(d, t / "spm"), "default"),
    # StarCoder2's real tokenizer hashes to "starcoder"; the fixture's (SmolLM2's vocabulary) is told
    # apart by structure only and is named "smollm": the same pre-tokenizer regexes in llama.cpp.
    "starcoder2": Family(lambda d, t: build_starcoder2(d, t / "starcoder2"), "smollm"),
    "ernie4.5": Family(lambda d, t: build_ernie45(d, t / "ernie"), "default",
                       {"tokenizer.ggml.add_space_prefix": ("llama.cpp False, edge-llm None", NULL_PREFIX_SPACE)}),
    # GLM's real tokenizers hash to "chatglm-bpe" / "glm4"; the fixture's has GLM-4's cl100k split
    # regex (llama-bpe's), which each family then names as llama.cpp expects.
    "chatglm3": Family(lambda d, t: build_chatglm3(d, t / "spm"), "chatglm-spm"),
    "glm4-9b-chat-hf": Family(lambda d, t: build_glm(d, t / "glm", "glm"), "chatglm-bpe"),
    "glm4-0414": Family(lambda d, t: build_glm(d, t / "glm", "glm4"), "glm4"),
    # DeepSeek's real tokenizers hash to "deepseek-llm"/"deepseek-v3", LFM2's to "lfm2"; the fixtures
    # have Llama 3's split regex (llama.cpp runs the same one for "lfm2").
    "deepseek-v2": Family(lambda d, t: build_deepseek_v2(d, t / "deepseek"), "llama-bpe"),
    "lfm2": Family(lambda d, t: build_lfm2(d, t / "lfm2"), "llama-bpe"),
    "gpt-oss": Family(lambda d, t: build_gpt_oss(d, t / "gpt-oss"), "gpt-4o"),
    "phi4-mini": Family(lambda d, t: build_phi3(d, t / "phi4-mini", phi4_mini=True), "gpt-4o"),
}


