"""SmolVLM / Idefics3: a SigLIP-like tower whose patch grid is pixel-shuffled (scale_factor x
scale_factor patches into one token) and projected by one matrix. The language model is a Llama
(`model.text_model.*`), converted by llama.LlamaModel."""

from __future__ import annotations

import gguf

from edge_llm.convert.mmproj import Projector


class Idefics3Projector(Projector):
    kept_f32 = (".embeddings.",)
    hf_architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.IDEFICS3

    def owns(self, name: str) -> str | None:
        if "vision_tower" in name or "vision_model" in name or "model.connector" in name:
            return name
        return None

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_vision_attention_layernorm_eps(self.vision.get("layer_norm_eps", 1e-5))
        w.add_vision_projector_scale_factor(self.config.get("scale_factor", 2))
        w.add_vision_use_gelu(True)
        # Images are resized so that their longest edge is this, then cut into image_size tiles.
        size = self.preprocessor.get("size")
        longest = size.get("longest_edge") if isinstance(size, dict) else None
        w.add_vision_preproc_image_size(longest if longest is not None else self.vparam("image_size"))

