"""LLaVA-1.5 (LlavaForConditionalGeneration with a CLIP tower): the projector GGUF in the format of
llama.cpp's own LLaVA path, tools/mtmd/legacy-models (llava_surgery_v2.py, then
convert_image_encoder_to_gguf.py --llava-projector): convert_hf_to_gguf.py's --mmproj does not take a
CLIP tower. That format has its own key set (`clip.has_llava_projector`, `clip.use_gelu`...), its own
tensor names (the MLP's fc1 is `ffn_down`: mtmd swaps them back) and its own types (every 2-D weight
and the conv kernel F16, even in an f32 file the kernel). The tower is cut after the layer the
language model reads (vision_feature_layer, -2 for LLaVA-1.5) and its post-LayerNorm is dropped; the
language model is a Llama (llama.LlamaModel).
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf

from edge_llm.convert.base import PlannedTensor
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.mmproj import Projector

# convert_image_encoder_to_gguf.py's get_tensor_name, as ordered replacements on the CLIP name.
_RENAMES = (("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
            ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
            ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln"))
_PROJECTOR = {"linear_1": "mm.0", "linear_2": "mm.2"}


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


class LlavaProjector(Projector):
    hf_architectures = ("LlavaForConditionalGeneration",)
    projector_type = "mlp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.vision.get("model_type") != "clip_vision_model":
            raise CheckpointError(f"LLaVA with a {self.vision.get('model_type')!r} vision tower: only LLaVA-1.5's "
                                  "CLIP tower is converted (llama.cpp's converter takes Pixtral's)")
        strategy = self.config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise CheckpointError(f"vision_feature_select_strategy {strategy!r}: llama.cpp's LLaVA projector drops "
                                  "the class token ('default')")
        layers = int(self.vparam("num_hidden_layers"))
        selected = self.config.get("vision_feature_layer", -2)
        if selected == -2:  # LLaVA-1.5: the tower minus its last layer, the legacy converter's default
            self.feature_layers: list[int] | None = None
            self.kept_layers = layers - 1
        else:
            chosen = selected if isinstance(selected, list) else [selected]
            self.feature_layers = [i if i >= 0 else layers + i + 1 for i in chosen]
            if not all(isinstance(i, int) and 0 < i <= layers for i in self.feature_layers):
                raise CheckpointError(f"vision_feature_layer {selected!r} is outside the {layers}-layer tower")
            self.kept_layers = max(self.feature_layers)
        self.block_count = self.kept_layers

    def set_params(self, w: gguf.GGUFWriter) -> None:
        """convert_image_encoder_to_gguf.py's keys for a vision-only CLIP with a LLaVA projector."""
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_llava_projector", True)
        w.add_description("image encoder for LLaVA")
        w.add_string("clip.projector_type", self.projector_type)
        w.add_uint32("clip.vision.image_size", self.vparam("image_size"))
        w.add_uint32("clip.vision.patch_size", self.vparam("patch_size"))
        w.add_uint32("clip.vision.embedding_length", self.vparam("hidden_size"))
        w.add_uint32("clip.vision.feed_forward_length", self.vparam("intermediate_size"))
        w.add_uint32("clip.vision.projection_dim", self.vparam("projection_dim"))
        w.add_uint32("clip.vision.attention.head_count", self.vparam("num_attention_heads"))
        w.add_float32("clip.vision.attention.layer_norm_epsilon", self.vparam("layer_norm_eps"))
        w.add_uint32("clip.vision.block_count", self.kept_layers)
        if self.feature_layers:
            w.add_array("clip.vision.feature_layer", self.feature_layers)
        for key in ("image_mean", "image_std"):
            value = self.preprocessor.get(key)
            if not isinstance(value, list) or len(value) != 3:
                raise CheckpointError(f"{self.hf_dir}: preprocessor_config.json needs a 3-value {key} for the projector")
            w.add_array(f"clip.vision.{key}", value)
        w.add_bool("clip.use_gelu", self.vparam("hidden_act") == "gelu")

    def owns(self, name: str) -> str | None:
        """The CLIP name (`vision_model.*`) or the projector's, from either layout of the tower."""
        name = name.removeprefix("model.")
        if name.startswith("multi_modal_projector."):
            return name
        if not name.startswith("vision_tower."):
            return None
        name = name.removeprefix("vision_tower.")
        return name if name.startswith("vision_model.") else "vision_model." + name

    def gguf_tensors(self) -> Iterator[tuple[str, str, Lazy]]:
        """The projector's two layers first, then the tower up to the layer the model reads (the
        legacy converter's order and names; the tensors squeezed as it squeezes them)."""
        projector, tower = [], []
        for hf_name, tensor in self.tensors.items():
            name = self.owns(hf_name)
            if name is None:
                continue
            if name.startswith("multi_modal_projector."):
                part, kind = name.split(".")[1:3]
                if part not in _PROJECTOR:
                    raise CheckpointError(f"unexpected LLaVA projector tensor {hf_name}")
                projector.append((hf_name, f"{_PROJECTOR[part]}.{kind}", tensor))
                continue
            if name in ("vision_model.embeddings.position_ids", "vision_model.post_layernorm.weight",
                        "vision_model.post_layernorm.bias"):
                continue
            parts = name.split(".")
            if parts[1:3] == ["encoder", "layers"] and int(parts[3]) >= self.kept_layers:
                continue
            for old, new in _RENAMES:
                name = name.replace(old, new)
            tower.append((hf_name, name, tensor))
        for hf_name, name, tensor in projector + tower:
            shape = _squeeze(tuple(tensor.shape))
            yield hf_name, name, tensor if shape == tuple(tensor.shape) else tensor.then(
                lambda x, shape=shape: x.reshape(shape), shape)

    def tensor_qtype(self, hf_name: str, name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
        """The legacy converter's types: F16 conv kernels always; F16 projector matrices always; in an
        f16 file every other 2-D `.weight` F16 too; the rest F32."""
        f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
        if name.startswith("mm."):
            return f16 if len(shape) in (2, 4) else f32
        if len(shape) == 4:
            return f16
        return f16 if outtype == "f16" and name.endswith(".weight") and len(shape) == 2 else f32

    def plan(self, outtype: str) -> list[PlannedTensor]:
        if outtype not in ("f16", "f32"):
            raise CheckpointError(f"LLaVA-1.5's projector format is f16 or f32, not {outtype} "
                                  "(convert it with --outtype f16, then quantize the language model with --quant)")
        return super().plan(outtype)
