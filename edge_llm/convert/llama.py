"""Llama (Llama-2/3, Mistral, TinyLlama, SmolLM...): q/k permuted for llama.cpp's RoPE, llama3 rope
scaling as a `rope_freqs` tensor."""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model, permute_qk
from edge_llm.convert.checkpoint import Lazy


class LlamaModel(Model):
    arch = gguf.MODEL_ARCH.LLAMA
    hf_architectures = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.config.get("vocab_size"):
            w.add_vocab_size(int(self.config["vocab_size"]))
        w.add_rope_dimension_count(self.head_dim)

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head))
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head_kv))
        yield from super().modify(name, tensor, bid)

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        if (self.rope.get("rope_type") or "").lower() == "llama3":
            factors = llama3_rope_factors(self.rope, self.rope_theta or 10000.0, self.head_dim)
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", Lazy(factors.shape, lambda: factors)


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
