"""DeepSeek-V2 / V2-Lite (and V3's layout): multi-head latent attention and MoE with shared experts.

llama.cpp runs MLA as multi-query attention over the compressed KV ("absorption"), so `kv_b_proj`
is split per head into k_b (transposed) and v_b; KV heads are written as 1. The first
`first_k_dense_replace` layers keep a dense MLP; the rest stack their routed experts."""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import Lazy


class DeepseekV2Model(Model):
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    vocab_kind = "bpe"
    block_tensors = ("attn_norm", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b", "attn_output",
                     "ffn_norm")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_head_kv_mla = self.n_head_kv  # the uncompressed heads kv_b_proj expands to
        self.hparams.setdefault("rms_norm_eps", 1e-6)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        hp = self.hparams
        super().set_params(w)
        w.add_head_count_kv(1)  # MLA as MQA over the latent
        moe = hp.get("n_routed_experts") is not None
        first_dense = hp.get("first_k_dense_replace")
        w.add_leading_dense_block_count(first_dense if first_dense is not None else 0 if moe else self.block_count)
        kv_lora_rank = hp.get("kv_lora_rank", 512)
        w.add_vocab_size(hp["vocab_size"])
        if hp.get("q_lora_rank") is not None:
            w.add_q_lora_rank(hp["q_lora_rank"])
        w.add_kv_lora_rank(kv_lora_rank)
        w.add_key_length(kv_lora_rank + hp["qk_rope_head_dim"])
        w.add_value_length(kv_lora_rank)
        w.add_key_length_mla(hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
        w.add_value_length_mla(hp["v_head_dim"])
        w.add_expert_feed_forward_length(self.find("moe_intermediate_size", "intermediate_size"))
        if moe:
            w.add_expert_count(hp["n_routed_experts"])
        w.add_expert_shared_count(hp.get("n_shared_experts", 0))
        if hp.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(hp["routed_scaling_factor"])
        if hp.get("norm_topk_prob"):
            w.add_expert_weights_norm(hp["norm_topk_prob"])
        w.add_rope_dimension_count(hp["qk_rope_head_dim"])
        if self.rope.get("mscale_all_dim") is not None:
            # as llama.cpp's converter (its DEEPSEEK2 yarn log multiplier is 0.1 * mscale_all_dim)
            w.add_rope_scaling_yarn_log_mul(0.1 * self.rope["mscale_all_dim"])

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        if name is None:
            return None
        if self.hparams.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
            return None
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and layer.isdecimal() and int(layer) >= self.block_count:
            return None  # multi-token-prediction layers past the model (DeepSeek-V3), as llama.cpp skips them
        return name

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if not name.endswith("kv_b_proj.weight"):
            yield from super().modify(name, tensor, bid)
            return
        hp = self.hparams
        heads, nope, v_dim = self.n_head_kv_mla, hp["qk_nope_head_dim"], hp["v_head_dim"]
        rank = tensor.shape[-1]

        def per_head(x):
            return np.asarray(x).reshape(heads, nope + v_dim, rank)

        k_b = tensor.then(lambda x: per_head(x)[:, :nope].transpose(0, 2, 1), (heads, rank, nope))
        v_b = tensor.then(lambda x: per_head(x)[:, nope:], (heads, v_dim, rank))
        yield from super().modify(name.replace("kv_b_proj", "k_b_proj"), k_b, bid)
        yield from super().modify(name.replace("kv_b_proj", "v_b_proj"), v_b, bid)

    def expected_shapes(self) -> dict[str, tuple]:
        vocab = self.hparams.get("vocab_size")
        return {"token_embd": (vocab, self.n_embd), "output": (vocab, self.n_embd), "output_norm": (self.n_embd,)}
