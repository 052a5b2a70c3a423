"""Llama and the families llama.cpp runs as Llama or close to it: Llama-2/3 (llama3 RoPE scaling as a
`rope_freqs` tensor), Mistral, Mixtral (experts stacked per layer), SmolLM3 (no RoPE on every 4th
layer, which llama.cpp's SMOLLM3 graph knows), Granite 3 (four scalar multipliers) and InternLM3."""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import Lazy
from edge_llm.convert.vocab import add_sentencepiece_vocab, special_vocab, tokenizer_config


class LlamaModel(Model):
    arch = gguf.MODEL_ARCH.LLAMA
    # The language model of LLaVA and SmolVLM / Idefics3 checkpoints too (SmolVLM's text_config
    # names it VLlama3ForCausalLM; Idefics3-8B's names none).
    hf_architectures = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "VLlama3ForCausalLM",
                        "LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration",
                        "SmolVLMForConditionalGeneration")
    permute_qk = True

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        super().set_vocab(w)
        config = tokenizer_config(self.hf_dir)
        if config.get("add_prefix_space") is not None:
            w.add_add_space_prefix(config["add_prefix_space"])
        # llama.cpp's converter's rules by vocabulary size: CodeLlama's end of turn (its FIM ids have
        # no GGUF keys in gguf-py), and no BOS for the 49,152-token vocabulary of Granite and SmolLM.
        vocab_size = self.hparams.get("vocab_size", 32000)
        if vocab_size == 32016:
            w.add_eot_token_id(32010)
        if vocab_size == 49152:
            w.add_add_bos_token(False)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.hparams.get("vocab_size"):
            w.add_vocab_size(int(self.hparams["vocab_size"]))
        w.add_rope_dimension_count(self.head_dim)

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        rope = self.rope.get("full_attention", self.rope)
        if (rope.get("rope_type") or "").lower() == "llama3":
            factors = llama3_rope_factors(rope, self.rope_theta or 10000.0, self.head_dim)
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", Lazy(factors.shape, lambda: factors)


class MixtralModel(LlamaModel):
    hf_architectures = ("MixtralForCausalLM",)
    block_tensors = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                     "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    def expert_name(self, prefix: str, kind: str, bid: int) -> str:
        return f"layers.{bid}.feed_forward.experts.{kind}.weight"  # the name the tensor map knows


class SmolLM3Model(LlamaModel):
    arch = gguf.MODEL_ARCH.SMOLLM3
    hf_architectures = ("SmolLM3ForCausalLM",)


class GraniteModel(LlamaModel):
    """Granite 3.x dense: Llama with attention, embedding, residual and logit multipliers."""

    arch = gguf.MODEL_ARCH.GRANITE
    hf_architectures = ("GraniteForCausalLM",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # llama.cpp's converter drops head_dim for Granite (its graph derives it).
        self.hparams.pop("head_dim", None)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        hp = self.hparams
        for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                         ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
            if hp.get(key):
                add(hp[key])


class InternLM3Model(LlamaModel):
    """InternLM3: Llama's tensors; a SentencePiece vocabulary whose chat turns end with <|im_end|>."""

    hf_architectures = ("InternLM3ForCausalLM",)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        config = tokenizer_config(self.hf_dir)
        # A null add_prefix_space is no setting (llama.cpp's converter writes it as False, which
        # makes llama.cpp drop the prefix space the HF tokenizer adds).
        n_vocab = add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), special=False,
                                          space_prefix=config.get("add_prefix_space"))
        special = special_vocab(self.hf_dir, n_vocab)
        # As llama.cpp's converter: a chat model's eos is <|im_end|> when that is a special token.
        for tid, data in config.get("added_tokens_decoder", {}).items():
            if data.get("special") and data.get("content") == "<|im_end|>" and "eos" in special.special_token_ids:
                special.special_token_ids["eos"] = int(tid)
        special.add_to_gguf(w, quiet=True)


def llama3_rope_factors(rope: dict, base: float, dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling, as llama.cpp wants it: one factor per frequency."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


class Olmo2Model(Model):
    """OLMo 2: norms after attention and MLP (no pre-norms), q/k norms over all heads together."""

    arch = gguf.MODEL_ARCH.OLMO2
    hf_architectures = ("Olmo2ForCausalLM",)
    block_tensors = ("attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_gate", "ffn_up",
                     "ffn_down", "post_ffw_norm")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        hp = self.hparams
        if "sliding_window" in hp:  # OLMo 3 (same GGUF architecture)
            w.add_sliding_window(hp["sliding_window"])
            pattern = ([t == "sliding_attention" for t in hp["layer_types"]] if "layer_types" in hp
                       else [(i + 1) % 4 != 0 for i in range(self.block_count)])
            w.add_sliding_window_pattern(pattern)

    def expected_shapes(self) -> dict[str, tuple]:
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {**super().expected_shapes(), "attn_q_norm": (q,), "attn_k_norm": (kv,)}
