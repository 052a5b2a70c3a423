"""The shared core of every vision projector: the vision half of a vision-language checkpoint as the
"mmproj" GGUF (architecture `clip`) that llama.cpp's mtmd loads beside the text GGUF.

A family module subclasses `Projector` the way a text family subclasses `base.Model`: `owns` says
which checkpoint tensors belong to the projector file and under which name the tensor map knows
them, `modify` splits or rescales, `set_params` adds the family's keys, `forced_qtype` the tensors
llama.cpp's converter keeps at a fixed type. What is shared follows llama.cpp's MmprojModel
(conversion/base.py): the keys every projector has, the vision settings read from `vision_config`
(with transformers' defaults for the keys hub configs leave out, since llama.cpp reads the config
through transformers), the image mean/std from preprocessor_config.json / processor_config.json,
and its type rules. Files are written by base.write_gguf, tensor by tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import gguf

from edge_llm.convert.base import PlannedTensor, tensor_qtype
from edge_llm.convert.checkpoint import CheckpointError, Lazy

# Layer-count keys of the vision configs llama.cpp knows (MmprojModel.n_block_keys).
_BLOCK_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers", "depth", "layers", "encoder_layers",
               "vt_num_hidden_layers")
# transformers' vision-config-class defaults, by vision_config.model_type, for the keys read here
# (tests/test_convert_mmproj.py checks them against transformers).
VISION_DEFAULTS: dict[str, dict] = {
    "siglip_vision_model": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                            "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-6,
                            "hidden_act": "gelu_pytorch_tanh"},
    "idefics3_vision": {"image_size": 224, "patch_size": 32, "hidden_size": 1152, "intermediate_size": 3072,
                        "num_hidden_layers": 12, "num_attention_heads": 16, "layer_norm_eps": 1e-6,
                        "hidden_act": "gelu_pytorch_tanh"},
    "smolvlm_vision": {"image_size": 224, "patch_size": 32, "hidden_size": 1152, "intermediate_size": 3072,
                       "num_hidden_layers": 12, "num_attention_heads": 16, "layer_norm_eps": 1e-6,
                       "hidden_act": "gelu_pytorch_tanh"},
    "qwen2_vl_vision": {"patch_size": 14, "hidden_size": 3584, "hidden_act": "quick_gelu", "depth": 32,
                        "num_heads": 16, "embed_dim": 1280},
    "qwen2_5_vl_vision": {"patch_size": 14, "hidden_size": 3584, "intermediate_size": 3420, "hidden_act": "silu",
                          "depth": 32, "num_heads": 16, "fullatt_block_indexes": [7, 15, 23, 31]},
    "clip_vision_model": {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-5,
                          "hidden_act": "quick_gelu", "projection_dim": 512},
    "internvl_vision": {"image_size": [448, 448], "patch_size": [14, 14], "hidden_size": 1024,
                        "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def preprocessor_config(hf_dir: Path) -> dict:
    """The image preprocessing settings: preprocessor_config.json, then processor_config.json over it
    (each one's nested processor settings lifted to the top), as llama.cpp's converter merges them."""
    merged: dict = {}
    for name, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = hf_dir / name
        if path.is_file():
            data = read_json(path)
            if isinstance(data.get(nested), dict):
                data = {**data, **data[nested]}
            merged.update(data)
    return merged


class Projector:
    """The vision tower and projector of a vision-language checkpoint, as one `clip` GGUF."""

    kept_f32: tuple[str, ...] = ()  # tensors llama.cpp's converter keeps in F32 for this family

    arch = gguf.MODEL_ARCH.MMPROJ
    hf_architectures: tuple[str, ...] = ()
    projector_type: str

    def __init__(self, hf_dir: Path, config: dict, tensors: dict[str, Lazy]):
        self.hf_dir, self.config, self.tensors = hf_dir, config, tensors
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{hf_dir}: config.json has no vision_config, so there is no projector to write")
        self.vision = {**VISION_DEFAULTS.get(vision.get("model_type"), {}), **vision}
        self.adapt_vision(self.vision)
        text = config.get("text_config") or config.get("llm_config") or {}
        text = {**config, **text}
        self.n_embd_text = int(text.get("hidden_size", text.get("n_embd", 0)) or 0)
        if self.n_embd_text <= 0:
            raise CheckpointError(f"{hf_dir}: config.json names no hidden_size for the language model")
        self.preprocessor = preprocessor_config(hf_dir)
        try:
            self.block_count = int(self.vparam(*_BLOCK_KEYS))
        except (TypeError, ValueError):
            raise CheckpointError(f"{hf_dir}: vision_config has no usable layer count") from None
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)

    def adapt_vision(self, vision: dict) -> None:
        """Rename or complete the family's vision settings in place (before anything reads them)."""

    def vparam(self, *keys: str, default=KeyError):
        for key in keys:
            if key in self.vision:
                return self.vision[key]
        if default is KeyError:
            raise CheckpointError(f"vision_config lacks {keys[0]!r} (needed for the projector)")
        return default

    # --- keys ---------------------------------------------------------------------------------------
    def set_params(self, w: gguf.GGUFWriter) -> None:
        """MmprojModel.set_gguf_parameters: what every vision projector file has."""
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(self.n_embd_text)
        w.add_vision_image_size(self.vparam("image_size"))
        w.add_vision_patch_size(self.vparam("patch_size"))
        w.add_vision_embedding_length(self.vparam("hidden_size", "width", "vt_hidden_size"))
        w.add_vision_feed_forward_length(self.vparam("intermediate_size", "vt_intermediate_size"))
        w.add_vision_block_count(self.vparam(*_BLOCK_KEYS))
        w.add_vision_head_count(self.vparam("num_attention_heads", "num_heads", "heads", "vt_num_attention_heads"))
        for key in ("image_mean", "image_std"):
            value = self.preprocessor.get(key)
            if not isinstance(value, list) or len(value) != 3:
                raise CheckpointError(f"{self.hf_dir}: preprocessor_config.json needs a 3-value {key} for the projector")
        w.add_vision_image_mean(self.preprocessor["image_mean"])
        w.add_vision_image_std(self.preprocessor["image_std"])
        w.add_clip_projector_type(self.projector_type)

    def add_activation(self, w: gguf.GGUFWriter, act: str) -> None:
        if act == "silu":
            w.add_vision_use_silu(True)
        elif act == "gelu":
            w.add_vision_use_gelu(True)
        else:
            raise CheckpointError(f"unsupported vision activation {act!r} (llama.cpp runs gelu or silu)")

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        """A projector file has no vocabulary."""

    # --- tensors ------------------------------------------------------------------------------------
    def owns(self, name: str) -> str | None:
        """The name under which the tensor map knows this checkpoint tensor, None when it is not the
        projector's (the language model's, or a part llama.cpp does not run)."""
        raise NotImplementedError

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CheckpointError(f"tensor {name!r} has no GGUF name for a {self.projector_type} projector: the "
                                  "checkpoint does not match its config.json architecture")
        return new

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        yield self.map_name(name), tensor

    def split_qkv(self, name: str, tensor: Lazy, parts: tuple[str, str, str], bid: int | None,
                  fused: str = "qkv") -> Iterable[tuple[str, Lazy]]:
        """A fused q/k/v tensor (rows q, then k, then v) as three, `fused` in its name replaced by
        each of `parts`, each mapped as `modify` maps it (Projector.modify, not a subclass's)."""
        rows = tensor.shape[0]
        if rows % 3:
            raise CheckpointError(f"{name}: fused q/k/v with {rows} rows, not a multiple of 3")
        third = rows // 3
        for i, part in enumerate(parts):
            yield from Projector.modify(self, name.replace(fused, part), tensor.row_slice(i * third, (i + 1) * third), bid)

    def gguf_tensors(self) -> Iterator[tuple[str, str, Lazy]]:
        """(checkpoint name, GGUF name, tensor) of every projector tensor, in checkpoint order."""
        for hf_name, tensor in self.tensors.items():
            name = self.owns(hf_name)
            if name is None or name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
                continue
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            for new_name, new in self.modify(name, tensor, bid):
                yield hf_name, new_name, new

    def forced_qtype(self, hf_name: str, name: str, outtype: str) -> gguf.GGMLQuantizationType | None:
        """MmprojModel.tensor_force_quant: the family's `kept_f32` tensors (a piece of the checkpoint's
        or the GGUF name) stay F32; patch embeddings (conv kernels) F16 in an f16 file, F32 in any other."""
        if any(piece in hf_name or piece in name for piece in self.kept_f32):
            return gguf.GGMLQuantizationType.F32
        if ".patch_embd.weight" in name or ".patch_merger.weight" in name:
            return gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
        return None

    def tensor_qtype(self, hf_name: str, name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
        forced = self.forced_qtype(hf_name, name, outtype)
        if len(shape) <= 1 or name.endswith("_norm.weight"):
            return gguf.GGMLQuantizationType.F32
        if forced is not None:
            return forced
        if name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + "."):
            return gguf.GGMLQuantizationType.F32
        return tensor_qtype(name, shape, outtype)

    def plan(self, outtype: str) -> list[PlannedTensor]:
        planned = [PlannedTensor(name, tensor, self.tensor_qtype(hf_name, name, tuple(tensor.shape), outtype))
                   for hf_name, name, tensor in self.gguf_tensors()]
        names = [p.name for p in planned]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"the checkpoint maps several tensors to {', '.join(dup[:3])}")
        missing = [f"v.blk.{b}" for b in range(self.block_count) if not any(n.startswith(f"v.blk.{b}.") for n in names)]
        if not any(n.startswith("mm.") for n in names):
            missing.insert(0, "the projector (mm.*)")
        if missing:
            raise CheckpointError(f"the checkpoint's vision half is incomplete: no {', '.join(missing[:3])} "
                                  "(a shard may be absent)")
        return planned
