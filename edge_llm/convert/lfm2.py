"""LFM2 (Liquid): a hybrid of short gated convolutions and attention layers. KV heads are written
per layer (0 for convolution layers); the convolution kernels lose their middle axis; the MLP width
is the adjusted one LFM2 computes from its config; the final norm is named `embedding_norm`."""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import Lazy


class LFM2Model(Model):
    arch = gguf.MODEL_ARCH.LFM2
    hf_architectures = ("Lfm2ForCausalLM", "LFM2ForCausalLM")
    vocab_kind = "bpe"
    block_tensors = ("attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    required_tensors = ("token_embd.weight", "token_embd_norm.weight")

    @property
    def ff_dim(self) -> int:
        hp = self.hparams
        ff = int(self.find("block_ff_dim", "intermediate_size"))
        if hp.get("block_auto_adjust_ff_dim"):
            ff = int(2 * ff / 3)
            if hp.get("block_ffn_dim_multiplier") is not None:
                ff = int(hp["block_ffn_dim_multiplier"] * ff)
            multiple = hp["block_multiple_of"]
            ff = multiple * ((ff + multiple - 1) // multiple)
        return ff

    def set_params(self, w: gguf.GGUFWriter) -> None:
        hp = self.hparams
        super().set_params(w)
        w.add_head_count_kv([self.n_head_kv if kind != "conv" else 0 for kind in hp["layer_types"]])
        w.add_vocab_size(hp["vocab_size"])
        w.add_shortconv_l_cache(hp["conv_L_cache"])
        w.add_layer_norm_rms_eps(hp["norm_eps"])
        w.add_feed_forward_length(self.ff_dim)

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        return None if name is None else name.replace("lfm.", "model.")

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if "conv.conv" in name and len(tensor.shape) == 3:  # (channels, 1, kernel) -> (channels, kernel)
            tensor = tensor.then(lambda x: x.reshape(x.shape[0], x.shape[2]), (tensor.shape[0], tensor.shape[2]))
        yield from super().modify(name, tensor, bid)

    def expected_shapes(self) -> dict[str, tuple]:
        ff = self.ff_dim
        return {**super().expected_shapes(), "ffn_gate": (ff, self.n_embd), "ffn_up": (ff, self.n_embd),
                "ffn_down": (self.n_embd, ff)}
