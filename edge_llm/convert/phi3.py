"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (Phi3ForCausalLM). q/k/v stay fused in one `qkv_proj` and
gate/up in one `gate_up_proj` (llama.cpp's PHI3 graph splits them); NEOX RoPE, so no permutation;
partial rotary (Phi-4-mini) sets the RoPE dimension; LongRoPE's per-frequency factors become the
`rope_factors_long/short` tensors. Phi-3's SentencePiece vocabulary or Phi-4's byte-level BPE."""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model, rope_factor_tensors
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.vocab import add_bpe_vocab, add_sentencepiece_vocab, tokenizer_config


class Phi3Model(Model):
    arch = gguf.MODEL_ARCH.PHI3
    hf_architectures = ("Phi3ForCausalLM",)
    block_tensors = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")

    @property
    def rope_dims(self) -> int:
        return int(self.rope.get("partial_rotary_factor", 1.0) * self.n_embd) // self.n_head

    @property
    def original_context(self) -> int:
        if "original_max_position_embeddings" not in self.rope:
            raise CheckpointError("config.json lacks original_max_position_embeddings (Phi-3 needs it)")
        return int(self.rope["original_max_position_embeddings"])

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if tokenizer_config(self.hf_dir).get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
            add_bpe_vocab(w, self.hf_dir, self.hparams.get("vocab_size"))
        else:
            add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), added="strict")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        """Phi-3's own list, as llama.cpp's converter writes it (no generic RoPE scaling keys)."""
        hp = self.hparams
        w.add_context_length(int(self.find("n_positions", "max_position_embeddings")))
        w.add_rope_scaling_orig_ctx_len(self.original_context)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_block_count(self.block_count)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_rope_dimension_count(self.rope_dims)
        w.add_rope_freq_base(self.rope_theta)
        # A sliding window of 0 is how llama.cpp tells Phi-4 (none) from Phi-3 (one).
        w.add_sliding_window(hp.get("sliding_window") or 0)
        if self.rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(self.long_rope_attn_factor())

    def long_rope_attn_factor(self) -> float:
        scale = int(self.find("n_positions", "max_position_embeddings")) / self.original_context
        kind = (self.rope.get("rope_type") or "").lower()
        if kind in ("su", "longrope"):
            return math.sqrt(1 + math.log(scale) / math.log(self.original_context)) if scale > 1.0 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        raise CheckpointError(f"unsupported Phi-3 RoPE scaling {kind!r}")

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        if self.rope.get("long_factor"):  # Phi-3 writes them only with long factors
            yield from rope_factor_tensors(self.rope["long_factor"], self.rope.get("short_factor"), self.rope_dims)

    def expected_shapes(self) -> dict[str, tuple]:
        q, kv, ff = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.hparams.get("intermediate_size")
        return {**super().expected_shapes(), "attn_qkv": (q + 2 * kv, self.n_embd), "ffn_up": (2 * ff, self.n_embd)}
