"""Baichuan and Baichuan2: q, k and v packed in one `W_pack` tensor, split and permuted here.

Baichuan2's `NormHead` L2-normalizes each row of lm_head at run time; llama.cpp's BAICHUAN graph does
not, and llama.cpp's own converter writes the raw weights, so its Baichuan2 GGUFs compute wrong
logits. The rows are normalized here, once, at conversion.
"""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model, permute_qk
from edge_llm.convert.checkpoint import Lazy

BAICHUAN2_VOCAB = 125696


class BaichuanModel(Model):
    arch = gguf.MODEL_ARCH.BAICHUAN
    hf_architectures = ("BaichuanForCausalLM", "BaiChuanForCausalLM")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_tensor_data_layout("Meta AI original pth")
        w.add_rope_dimension_count(self.head_dim)

    @property
    def is_baichuan2(self) -> bool:
        """Baichuan2 is told apart by its own markers: NormHead in its model code (read, never run),
        z_loss_weight in its config, or its 125,696-token vocabulary."""
        code = self.hf_dir / "modeling_baichuan.py"
        return ("NormHead" in (code.read_text(encoding="utf-8", errors="replace") if code.is_file() else "")
                or "z_loss_weight" in self.config or self.config.get("vocab_size") == BAICHUAN2_VOCAB)

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if bid is not None and name == f"model.layers.{bid}.self_attn.W_pack.weight":
            rows = tensor.shape[0] // 3
            shape = (rows, *tensor.shape[1:])

            def part(i: int, heads: int | None):
                def take(x):
                    x = np.asarray(x[i * rows:(i + 1) * rows], dtype=np.float32)
                    return permute_qk(x, self.n_head, heads) if heads else x
                return tensor.then(take, shape)

            yield self.map_name(f"model.layers.{bid}.self_attn.q_proj.weight"), part(0, self.n_head)
            yield self.map_name(f"model.layers.{bid}.self_attn.k_proj.weight"), part(1, self.n_head_kv)
            yield self.map_name(f"model.layers.{bid}.self_attn.v_proj.weight"), part(2, None)
            return
        if name == "lm_head.weight" and self.is_baichuan2:
            tensor = tensor.then(normalize_rows)
        yield from super().modify(name, tensor, bid)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps
