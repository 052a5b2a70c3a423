"""Qwen2-VL and Qwen2.5-VL. The language model is Qwen2's with M-RoPE (llama.cpp's QWEN2VL: the
rotary dimensions split into time/height/width sections). The vision half is a ViT over 14-pixel
patches of frame pairs (one Conv3D, written as two Conv2D kernels), with fused q/k/v, 2-D RoPE, and
a 2x2 patch merger (LayerNorm, two matrices); Qwen2.5-VL has RMSNorm, a SwiGLU MLP and window
attention in all but every n-th block."""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.mmproj import Projector


class Qwen2VLModel(Model):
    arch = gguf.MODEL_ARCH.QWEN2VL
    hf_architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    vocab_kind = "bpe"


class Qwen2VLProjector(Projector):
    kept_f32 = (".position_embd.",)
    hf_architectures = Qwen2VLModel.hf_architectures

    def adapt_vision(self, vision: dict) -> None:
        """llama.cpp's names for the Qwen vision config's (Qwen2-VL's `hidden_size` is the merger's
        output width and `embed_dim` the tower's)."""
        vision.setdefault("image_size", 560)
        vision["num_attention_heads"] = vision.get("num_heads")
        vision["num_hidden_layers"] = vision.get("depth")
        if "embed_dim" in vision:
            vision["intermediate_size"] = vision.get("hidden_size")
            vision["hidden_size"] = vision.get("embed_dim")

    @property
    def projector_type(self) -> str:
        kind = self.config.get("model_type")
        if kind == "qwen2_vl":
            return gguf.VisionProjectorType.QWEN2VL
        if kind == "qwen2_5_vl":
            return gguf.VisionProjectorType.QWEN25VL
        raise CheckpointError(f"unknown Qwen VL model_type {kind!r}")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.projector_type == gguf.VisionProjectorType.QWEN25VL:
            w.add_vision_use_silu(True)
            full = self.vision.get("fullatt_block_indexes")
            if not full:
                raise CheckpointError("Qwen2.5-VL's vision_config needs fullatt_block_indexes")
            pattern = full[0] + 1  # window attention in every block but each pattern-th
            if any(b - a != pattern for a, b in zip(full, full[1:], strict=False)):
                raise CheckpointError(f"fullatt_block_indexes {full} are not evenly spaced")
            w.add_vision_n_wa_pattern(pattern)
        w.add_vision_attention_layernorm_eps(self.config.get("rms_norm_eps", 1e-6))

    def owns(self, name: str) -> str | None:
        name = name.removeprefix("model.") if name.startswith("model.visual.") else name
        return name if name.startswith("visual.") else None

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if ".qkv." in name:
            yield from self.split_qkv(name, tensor, ("q", "k", "v"), bid)
        elif "patch_embed.proj.weight" in name:
            if len(tensor.shape) != 5 or tensor.shape[2] != 2:
                raise CheckpointError(f"{name}: expected a Conv3D kernel over 2 frames, got shape {list(tensor.shape)}")
            shape = (*tensor.shape[:2], *tensor.shape[3:])
            base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
            yield base, tensor.then(lambda x: x[:, :, 0], shape)
            yield base + ".1", tensor.then(lambda x: x[:, :, 1], shape)
        else:
            yield from super().modify(name, tensor, bid)

