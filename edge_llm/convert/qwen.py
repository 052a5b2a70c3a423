"""Qwen2 (Qwen1.5, Qwen2, Qwen2.5: q/k/v biases), Qwen3 (q/k RMS norms) and their MoE versions
(Qwen1.5-MoE / Qwen2-MoE with a gated shared expert, Qwen3-MoE): llama.cpp runs them with NEOX-style
RoPE, which is HF's own layout, so no q/k permutation; experts are stacked per layer."""

from __future__ import annotations

import gguf

from edge_llm.convert.base import Model

MOE_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


class Qwen2Model(Model):
    arch = gguf.MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)
    vocab_kind = "bpe"


class Qwen3Model(Model):
    arch = gguf.MODEL_ARCH.QWEN3
    hf_architectures = ("Qwen3ForCausalLM",)
    vocab_kind = "bpe"


class Qwen2MoeModel(Model):
    arch = gguf.MODEL_ARCH.QWEN2MOE
    hf_architectures = ("Qwen2MoeForCausalLM",)
    vocab_kind = "bpe"
    block_tensors = MOE_BLOCK

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.hparams.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(self.hparams["moe_intermediate_size"])
        if self.hparams.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(self.hparams["shared_expert_intermediate_size"])


class Qwen3MoeModel(Qwen2MoeModel):
    arch = gguf.MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
