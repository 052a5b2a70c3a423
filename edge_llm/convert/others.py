"""Families that are a few lines each: StarCoder2 (LayerNorm with biases, a plain GELU MLP),
MiniCPM (Llama with embedding, residual and logit scales) and ERNIE 4.5 dense (q/k/v and gate/up
split when a checkpoint fuses them)."""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model, permute_qk, rope_factor_tensors
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.vocab import add_sentencepiece_vocab, tokenizer_config

PLAIN_MLP_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_up", "ffn_down")


class StarCoder2Model(Model):
    arch = gguf.MODEL_ARCH.STARCODER2
    hf_architectures = ("Starcoder2ForCausalLM",)
    vocab_kind = "bpe"
    block_tensors = PLAIN_MLP_BLOCK


class MiniCPMModel(Model):
    """MiniCPM 1/2 (MiniCPMForCausalLM, remote code on the hub): Llama's tensors with the q/k
    permutation, plus muP-style scales llama.cpp's MINICPM graph applies from these keys."""

    arch = gguf.MODEL_ARCH.MINICPM
    hf_architectures = ("MiniCPMForCausalLM",)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"))

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        hp = self.hparams
        try:
            w.add_embedding_scale(float(hp["scale_emb"]))
            w.add_residual_scale(hp["scale_depth"] / self.block_count ** 0.5)
            w.add_logit_scale(self.n_embd / hp["dim_model_base"])
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc} (MiniCPM needs scale_emb, scale_depth, "
                                  "dim_model_base)") from None

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        # Only the weights are permuted (llama.cpp's converter leaves MiniCPM's biases as they are).
        if name.endswith("q_proj.weight"):
            tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head))
        elif name.endswith("k_proj.weight"):
            tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head_kv))
        yield from super().modify(name, tensor, bid)

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        return rope_factor_tensors(self.rope.get("long_factor"), self.rope.get("short_factor"),
                                   self.n_embd // self.n_head)


class Ernie45Model(Model):
    arch = gguf.MODEL_ARCH.ERNIE4_5
    hf_architectures = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_prefix = tokenizer_config(self.hf_dir).get("add_prefix_space")  # null: no setting (see InternLM3)
        add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), space_prefix=add_prefix)

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        return None if name is None else name.replace("ernie.", "model.")

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if "qkv_proj" in name:  # [q heads; k heads; v heads] rows
            q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
            for kind, (start, stop) in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
                yield from super().modify(name.replace("qkv_proj", f"{kind}_proj"), tensor.row_slice(start, stop), bid)
        elif "up_gate_proj" in name:  # [gate; up] rows, despite the name
            half = tensor.shape[0] // 2
            yield from super().modify(name.replace("up_gate_proj", "gate_proj"), tensor.row_slice(0, half), bid)
            yield from super().modify(name.replace("up_gate_proj", "up_proj"), tensor.row_slice(half, 2 * half), bid)
        else:
            yield from super().modify(name, tensor, bid)
