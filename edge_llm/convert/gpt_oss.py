"""gpt-oss (GptOssForCausalLM), from a checkpoint with dequantized (bf16) experts: attention sinks,
a biased router, and each layer's experts in one tensor per kind with gate and up interleaved
(gate = even rows, up = odd rows) and stored transposed; split and transposed here, per layer. (The
MXFP4-packed experts of OpenAI's own release are not converted here: --llama-cpp does that.)"""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import CheckpointError, Lazy


class GptOssModel(Model):
    arch = gguf.MODEL_ARCH.GPT_OSS
    hf_architectures = ("GptOssForCausalLM",)
    vocab_kind = "bpe"
    block_tensors = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sinks", "post_attention_norm",
                     "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.hparams.get("quantization_config") or {}).get("quant_method") == "mxfp4" or any(
                name.endswith(("_blocks", "_scales")) for name in self.tensors):
            raise CheckpointError("this gpt-oss checkpoint has MXFP4-packed experts, which edge-llm convert does "
                                  "not repack; use --llama-cpp DIR, or a checkpoint with bf16 experts")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_sliding_window(self.hparams["sliding_window"])
        w.add_expert_feed_forward_length(self.hparams["intermediate_size"])

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        return None if name is None else name + ".weight" if name.endswith("sinks") else name

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        if base.endswith("mlp.experts.down_proj_bias"):
            yield from super().modify(base.replace("down_proj_bias", "down_proj.bias"), tensor, bid)
        elif base.endswith("mlp.experts.down_proj"):  # (experts, ff, embd) -> (experts, embd, ff)
            e, ff, embd = tensor.shape
            yield from super().modify(base + ".weight", tensor.then(lambda x: np.swapaxes(x, 1, 2), (e, embd, ff)), bid)
        elif base.endswith("mlp.experts.gate_up_proj_bias"):  # (experts, 2 ff), interleaved
            e, ff2 = tensor.shape
            for kind, offset in (("gate_proj", 0), ("up_proj", 1)):
                part = tensor.then(lambda x, o=offset: x[:, o::2], (e, ff2 // 2))
                yield from super().modify(base.replace("gate_up_proj_bias", f"{kind}.bias"), part, bid)
        elif base.endswith("mlp.experts.gate_up_proj"):  # (experts, embd, 2 ff), interleaved
            e, embd, ff2 = tensor.shape
            for kind, offset in (("gate_proj", 0), ("up_proj", 1)):
                part = tensor.then(lambda x, o=offset: np.swapaxes(x, 1, 2)[:, o::2], (e, ff2 // 2, embd))
                yield from super().modify(base.replace("gate_up_proj", f"{kind}.weight"), part, bid)
        else:
            yield from super().modify(name, tensor, bid)

    def expected_shapes(self) -> dict[str, tuple]:
        return {k: v for k, v in super().expected_shapes().items() if not k.startswith("ffn_")}
