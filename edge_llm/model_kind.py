"""What a GGUF model is for: chat (it generates), embedding (it pools its states into a vector) or
rerank (it scores a query against a document), read from the file's header alone.

The rules, as llama.cpp and llama-server apply them:
- `{arch}.pooling_type` rank (4): a reranker; mean / cls / last (1-3): an embedding model.
- no pooling key: a classification head (`cls_out` or `cls` tensors: cross-encoders such as
  bge-reranker, ms-marco-MiniLM) makes a reranker; a non-causal encoder (`{arch}.attention.causal`
  false, or an encoder architecture) an embedding model (pooled by mean, sentence-transformers'
  default); anything else generates.

Only the header is read, array values skipped (a vocabulary of 150,000 strings costs a few
milliseconds), and the answer is cached while the file is unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

Kind = Literal["chat", "embedding", "rerank"]
KINDS: tuple[Kind, ...] = ("chat", "embedding", "rerank")

# llama.cpp's enum llama_pooling_type
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLING_IDS = {name: value for value, name in POOLING_NAMES.items()}
# Architectures llama.cpp runs as encoders whatever their keys say.
ENCODER_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                           "neo-bert", "eurobert", "t5encoder"})

# GGUF value types: fixed-size scalars (struct format), string 8, array 9.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_STRING = 1 << 30


@dataclass(frozen=True)
class ModelKind:
    kind: Kind
    pooling: str  # what pooled outputs use: "mean", "cls", "last", "rank" ("mean" for chat models)

    @property
    def pooling_id(self) -> int:
        return POOLING_IDS[self.pooling]


class GGUFHeaderError(ValueError):
    pass


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("the GGUF header is truncated")
    return data


def _string(f: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", _read(f, 8))
    if size > _MAX_STRING:
        raise GGUFHeaderError("a GGUF string is too long")
    return _read(f, size).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if kind == 8:
        return _string(f)
    if kind == 9:  # an array: skipped, its length kept
        item, count = struct.unpack("<IQ", _read(f, 12))
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == 8:
            for _ in range(count):
                (size,) = struct.unpack("<Q", _read(f, 8))
                f.seek(size, 1)
        else:
            raise GGUFHeaderError(f"unsupported GGUF array item type {item}")
        return count
    raise GGUFHeaderError(f"unsupported GGUF value type {kind}")


def read_header(path: Path) -> tuple[dict[str, object], set[str]]:
    """The scalar keys (arrays as their length) and the tensor names of a GGUF file."""
    with open(path, "rb", buffering=1 << 16) as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFHeaderError(f"{path} is not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
        keys: dict[str, object] = {}
        for _ in range(n_kv):
            key = _string(f)
            (kind,) = struct.unpack("<I", _read(f, 4))
            keys[key] = _value(f, kind)
        names = set()
        for _ in range(n_tensors):
            names.add(_string(f))
            (n_dims,) = struct.unpack("<I", _read(f, 4))
            f.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
    return keys, names


def kind_from_header(keys: dict[str, object], tensors: set[str]) -> ModelKind:
    arch = str(keys.get("general.architecture", ""))
    pooling = keys.get(f"{arch}.pooling_type")
    if pooling == POOLING_IDS["rank"]:
        return ModelKind("rerank", "rank")
    if pooling in (1, 2, 3):
        return ModelKind("embedding", POOLING_NAMES[int(pooling)])
    encoder = keys.get(f"{arch}.attention.causal") is False or arch in ENCODER_ARCHS
    if "cls_out.weight" in tensors or (encoder and "cls.weight" in tensors):
        return ModelKind("rerank", "rank")
    if encoder:
        return ModelKind("embedding", "mean")
    return ModelKind("chat", "mean")


@lru_cache(maxsize=64)
def _cached(path: str, mtime: float, size: int) -> ModelKind:
    return kind_from_header(*read_header(Path(path)))


def model_kind(path: Path) -> ModelKind:
    """The kind of the GGUF at `path` (a sharded model's first file); chat for anything else."""
    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        return ModelKind("chat", "mean")
    stat = path.stat()
    try:
        return _cached(str(path), stat.st_mtime, stat.st_size)
    except (OSError, GGUFHeaderError, struct.error):
        return ModelKind("chat", "mean")
