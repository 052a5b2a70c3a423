"""InternLM2: q, k and v interleaved per key/value group in one `wqkv` tensor, laid out as
[group][q_per_kv query heads, 1 key head, 1 value head][head_dim] rows; split and permuted here.
Its chat models end a turn with <|im_end|>, which becomes the GGUF's eos (as llama.cpp's converter
does), so generation stops there."""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model, permute_qk
from edge_llm.convert.checkpoint import Lazy
from edge_llm.convert.vocab import add_sentencepiece_vocab, added_tokens, special_vocab

CHAT_EOS = "<|im_end|>"


def _fix_piece(piece: str, kind: gguf.TokenType) -> tuple[bytes, gguf.TokenType]:
    """llama.cpp's InternLM2 vocabulary: a "\\x00" piece would read as an empty C string, so it becomes
    an emoji; "[UNUSED...]" placeholders are unused."""
    text = "\U0001f409" if piece == "\x00" else piece
    return text.encode(), gguf.TokenType.UNUSED if piece.startswith("[UNUSED") else kind


class InternLM2Model(Model):
    arch = gguf.MODEL_ARCH.INTERNLM2
    hf_architectures = ("InternLM2ForCausalLM",)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        n_vocab = add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), added="strict",
                                          fix_piece=_fix_piece, space_prefix="model", special=False)
        special = special_vocab(self.hf_dir, n_vocab)
        chat_eos = [tid for tid, text in added_tokens(self.hf_dir) if text == CHAT_EOS]
        if chat_eos:
            special.special_token_ids["eos"] = chat_eos[-1]
        special.add_to_gguf(w, quiet=True)

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if bid is None or name != f"model.layers.{bid}.attention.wqkv.weight":
            yield from super().modify(name, tensor, bid)
            return
        q_per_kv = self.n_head // self.n_head_kv
        d, n_embd = self.head_dim, self.n_embd

        def grouped(x) -> np.ndarray:
            return np.asarray(x).reshape(self.n_head_kv, q_per_kv + 2, d, n_embd)

        q = tensor.then(lambda x: permute_qk(grouped(x)[:, :q_per_kv].reshape(-1, n_embd), self.n_head),
                        (self.n_head * d, n_embd))
        k = tensor.then(lambda x: permute_qk(grouped(x)[:, -2].reshape(-1, n_embd), self.n_head, self.n_head_kv),
                        (self.n_head_kv * d, n_embd))
        v = tensor.then(lambda x: grouped(x)[:, -1].reshape(-1, n_embd), (self.n_head_kv * d, n_embd))
        for kind, part in (("wq", q), ("wk", k), ("wv", v)):
            yield self.map_name(f"model.layers.{bid}.attention.{kind}.weight"), part
