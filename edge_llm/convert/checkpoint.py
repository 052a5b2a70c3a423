"""An HF checkpoint folder on disk: config.json and its weights, read lazily, tensor by tensor.

Safetensors are parsed with gguf-py's own reader (`gguf.utility.SafetensorsLocal`) and memory-mapped,
so nothing is loaded until a tensor is written and no torch is imported. `.bin` (pickle) checkpoints
need torch (the `convert` extra) and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_llm.errors import EdgeLLMError, MissingExtraError

# safetensors dtype -> (numpy dtype, bytes per element); BF16 has no numpy dtype and is widened by hand.
_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
           "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
           "U8": (np.uint8, 1), "BOOL": (np.bool_, 1)}


class CheckpointError(EdgeLLMError):
    """The checkpoint on disk is incomplete or inconsistent."""


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the 16 bits and shift them into place."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass
class Lazy:
    """A tensor not read yet: its shape, and how to produce it as float32 (or its own float dtype).

    `rows(start, stop)`, when set, reads only rows [start, stop) of the tensor seen as a matrix of
    `shape[-1]` columns (leading dimensions flattened): the writer then converts a large tensor block
    by block and never holds it whole. A transform that needs the whole tensor (`then`) drops it;
    row slices (`row_slice`) and stacks of experts (`stack`) keep it.
    """

    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    rows: Callable[[int, int], np.ndarray] | None = None

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    def load(self) -> np.ndarray:
        data = self.produce()
        if data.shape != self.shape:  # a transform got the layout wrong: never write such a tensor
            raise CheckpointError(f"internal error: tensor came out {data.shape}, expected {self.shape}")
        return data

    def then(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...] | None = None) -> Lazy:
        """The same tensor with `fn` applied when it is read (`shape`: the shape `fn` returns)."""
        return Lazy(self.shape if shape is None else tuple(shape), lambda: fn(self.produce()))

    def row_slice(self, start: int, stop: int) -> Lazy:
        """Rows [start, stop) along the first axis (a split of a fused tensor), still streamable."""
        shape = (stop - start, *self.shape[1:])
        if self.rows is None or len(self.shape) != 2:
            return Lazy(shape, lambda: self.produce()[start:stop])
        return Lazy(shape, lambda: self.rows(start, stop), lambda a, b: self.rows(start + a, start + b))

    @staticmethod
    def stack(parts: list[Lazy]) -> Lazy:
        """One tensor of shape (len(parts), *part.shape), read part by part (MoE experts)."""
        inner = parts[0].shape
        if any(p.shape != inner for p in parts):
            raise CheckpointError(f"cannot stack tensors of shapes {sorted({p.shape for p in parts})}")
        per_part = parts[0].n_rows

        def rows(start: int, stop: int) -> np.ndarray:
            blocks = []
            while start < stop:
                i, offset = divmod(start, per_part)
                take = min(stop - start, per_part - offset)
                part = parts[i]
                block = (part.rows(offset, offset + take) if part.rows is not None
                         else part.load().reshape(per_part, -1)[offset:offset + take])
                blocks.append(block.reshape(take, inner[-1]))
                start += take
            return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

        shape = (len(parts), *inner)
        return Lazy(shape, lambda: np.stack([p.load() for p in parts]), rows if len(inner) >= 1 else None)


def read_config(hf_dir: Path) -> dict:
    """config.json as it is on disk (a JSON object)."""
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: not a folder (convert takes an HF checkpoint folder)")
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json, so this is not an HF checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def text_model_config(config: dict) -> dict:
    """The language model's settings: multimodal wrappers keep them in `text_config` (InternVL's
    remote-code release in `llm_config`), merged over the wrapper's own. The architecture is the
    text_config's when it names one (SmolVLM's VLlama3ForCausalLM, InternVL's Qwen2ForCausalLM), as
    llama.cpp's converter picks it, else the wrapper's (a text_config written by transformers'
    to_dict() carries "architectures": null)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        text = config.get("llm_config")
    if not isinstance(text, dict):
        return config
    return {**config, **text, "architectures": text.get("architectures") or config.get("architectures")}


def load_config(hf_dir: Path) -> dict:
    return text_model_config(read_config(hf_dir))


def _safetensors_tensors(path: Path) -> dict[str, Lazy]:
    from gguf.utility import SafetensorsLocal

    size = path.stat().st_size
    try:
        with SafetensorsLocal(path) as tensors:
            pass
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: not a valid safetensors file ({exc})") from None
    out = {}
    for name, info in tensors.items():
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {info.dtype}")
        dtype, width = _DTYPES[info.dtype]
        shape = tuple(int(d) for d in info.shape)
        if int(np.prod(shape)) * width != info.data_range.size:
            raise CheckpointError(f"{path.name}: tensor {name} has shape {list(shape)} but "
                                  f"{info.data_range.size} bytes of {info.dtype}: the file is corrupt")
        if info.data_range.offset + info.data_range.size > size:
            raise CheckpointError(f"{path.name} is truncated ({size} bytes; tensor {name} ends at byte "
                                  f"{info.data_range.offset + info.data_range.size}); download it again")

        def rows(start: int, stop: int, info=info, dtype=dtype, shape=shape, width=width,
                 bf16=info.dtype == "BF16") -> np.ndarray:
            """Rows of the tensor seen as a matrix of shape[-1] columns."""
            cols = shape[-1] if shape else 1
            raw = np.memmap(info.data_range.filename, mode="r", dtype=np.uint8,
                            offset=info.data_range.offset + start * cols * width, shape=((stop - start) * cols * width,))
            data = raw.view(dtype).reshape((stop - start, cols))
            return bf16_to_f32(data) if bf16 else data

        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        out[name] = Lazy(shape, lambda rows=rows, n=n_rows, shape=shape: rows(0, n).reshape(shape),
                         rows if len(shape) > 1 else None)
    return out


def _torch_bin_tensors(path: Path) -> dict[str, Lazy]:
    try:
        import torch
    except ImportError:
        raise MissingExtraError("torch (needed for .bin checkpoints; safetensors need none)", "convert") from None
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # pickle errors come in many types; one line is what the user needs
        raise CheckpointError(f"{path.name}: cannot load ({type(exc).__name__}: {exc})") from None

    def to_numpy(tensor) -> np.ndarray:
        if tensor.dtype == torch.bfloat16:
            return tensor.float().numpy()
        return tensor.numpy()

    return {name: Lazy(tuple(t.shape), lambda t=t: to_numpy(t)) for name, t in state.items()}


def _part_files(hf_dir: Path, prefix: str, suffix: str) -> list[Path]:
    index = hf_dir / f"{prefix}{suffix}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index.name}: bad index ({exc})") from None
        parts = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise CheckpointError(f"{hf_dir}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return parts
    single = hf_dir / f"{prefix}{suffix}"
    if single.is_file():
        return [single]
    return sorted(hf_dir.glob(f"{prefix}-*-of-*{suffix}"))


def load_tensors(hf_dir: Path) -> dict[str, Lazy]:
    """Every tensor of the checkpoint by its HF name, none of them read yet."""
    parts = _part_files(hf_dir, "model", ".safetensors")
    reader: Callable[[Path], dict[str, Lazy]] = _safetensors_tensors
    if not parts:
        parts, reader = _part_files(hf_dir, "pytorch_model", ".bin"), _torch_bin_tensors
    if not parts:
        raise CheckpointError(f"{hf_dir}: no weights (model*.safetensors or pytorch_model*.bin)")
    tensors: dict[str, Lazy] = {}
    for part in parts:
        tensors.update(reader(part))
    return tensors

