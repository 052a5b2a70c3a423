"""Qwen2 (Qwen1.5, Qwen2, Qwen2.5: q/k/v biases) and Qwen3 (q/k RMS norms). llama.cpp runs both
with NEOX-style RoPE, which is HF's own layout: no q/k permutation."""

from __future__ import annotations

import gguf

from edge_llm.convert.base import Model


class Qwen2Model(Model):
    arch = gguf.MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)
    vocab_kind = "bpe"


class Qwen3Model(Model):
    arch = gguf.MODEL_ARCH.QWEN3
    hf_architectures = ("Qwen3ForCausalLM",)
    vocab_kind = "bpe"
