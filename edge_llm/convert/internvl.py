"""InternVL: an InternViT (class token, layer scale `ls1/ls2`) whose patch grid is pixel-shuffled by
1/downsample_ratio, then a LayerNorm + 2-layer MLP projector; the language model is whatever
`text_config` / `llm_config` names (Qwen2 for InternVL3, Qwen3 for InternVL3.5...).

Two releases of the same weights: the original remote-code checkpoints (InternVLChatModel:
`vision_model.*` with fused q/k/v, `mlp1.*`, tiling limits in config.json), which llama.cpp's
converter reads, and the "-hf" ones that transformers reads natively (InternVLForConditionalGeneration:
`vision_tower.*` with separate q/k/v and `lambda_1/2`, `multi_modal_projector.*`, tiling limits in the
image processor's config), which llama.cpp's converter refuses. Both are written alike here, the
"-hf" names through the ones llama.cpp's tensor map has for Intern-S1 (the same layout).
"""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.mmproj import Projector

# Intern-S1's (and the "-hf" release's) projector under the original names.
_HF_PROJECTOR = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}


class InternVLProjector(Projector):
    hf_architectures = ("InternVLChatModel", "InternVLForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.INTERNVL
    kept_f32 = (".position_embd.",)

    def adapt_vision(self, vision: dict) -> None:
        for key in ("image_size", "patch_size"):  # the -hf config gives [height, width]
            if isinstance(vision.get(key), list):
                vision[key] = vision[key][0]

    @property
    def native(self) -> bool:
        """The transformers-native ("-hf") release."""
        return "InternVLForConditionalGeneration" in (self.config.get("architectures") or [])

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_vision_attention_layernorm_eps(self.vparam("layer_norm_eps"))
        self.add_activation(w, self.vparam("hidden_act"))
        ratio = self.config.get("downsample_ratio", 0.5 if self.native else None)
        if not ratio:
            raise CheckpointError("InternVL's config.json needs downsample_ratio")
        w.add_vision_projector_scale_factor(int(1.0 / ratio))
        if self.native:  # the -hf release keeps the tiling limits in its image processor's config
            low, high = self.preprocessor.get("min_patches", 0), self.preprocessor.get("max_patches", 0)
        else:
            low, high = self.config.get("min_dynamic_patch", 0), self.config.get("max_dynamic_patch", 0)
        if low > 0:
            w.add_vision_preproc_min_tiles(low)
        if high > 0:
            w.add_vision_preproc_max_tiles(high)

    def owns(self, name: str) -> str | None:
        if self.native and name.startswith(("vision_tower.", "multi_modal_projector.")):
            name = "model." + name  # the names llama.cpp's map knows for this layout (Intern-S1's)
        if not name.startswith(("vision_model", "mlp", "model.vision_tower", "model.multi_modal_projector")):
            return None
        if name.startswith("model.multi_modal_projector."):
            part, kind = name.split(".")[2:4]
            if part not in _HF_PROJECTOR:
                raise CheckpointError(f"unexpected InternVL projector tensor {name}")
            name = f"{_HF_PROJECTOR[part]}.{kind}"
        if name.startswith("vision_model"):
            name = "vision_tower." + name
        if (".ls" in name or ".lambda_" in name or "position_embedding" in name) and not name.endswith(".weight"):
            name += ".weight"
        return name

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if ".qkv." in name:
            yield from self.split_qkv(name, tensor, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), bid,
                                      fused="attn.qkv")
        else:
            yield from super().modify(name, tensor, bid)

