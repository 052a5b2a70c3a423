"""InternLM2: q, k and v interleaved per key/value group in one `wqkv` tensor, laid out as
[group][q_per_kv query heads, 1 key head, 1 value head][head_dim] rows; split and permuted here."""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model, permute_qk
from edge_llm.convert.checkpoint import Lazy


class InternLM2Model(Model):
    arch = gguf.MODEL_ARCH.INTERNLM2
    hf_architectures = ("InternLM2ForCausalLM",)

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if bid is None or name != f"model.layers.{bid}.attention.wqkv.weight":
            yield from super().modify(name, tensor, bid)
            return
        q_per_kv = self.n_head // self.n_head_kv
        d, n_embd = self.head_dim, self.n_embd

        def grouped(x) -> np.ndarray:
            return np.asarray(x, dtype=np.float32).reshape(self.n_head_kv, q_per_kv + 2, d, n_embd)

        q = tensor.then(lambda x: permute_qk(grouped(x)[:, :q_per_kv].reshape(-1, n_embd), self.n_head),
                        (self.n_head * d, n_embd))
        k = tensor.then(lambda x: permute_qk(grouped(x)[:, -2].reshape(-1, n_embd), self.n_head, self.n_head_kv),
                        (self.n_head_kv * d, n_embd))
        v = tensor.then(lambda x: grouped(x)[:, -1].reshape(-1, n_embd), (self.n_head_kv * d, n_embd))
        for kind, part in (("wq", q), ("wk", k), ("wv", v)):
            yield self.map_name(f"model.layers.{bid}.attention.{kind}.weight"), part
