"""`edge-llm info FILE.gguf`: what is inside a GGUF, from its header alone: the metadata values
and the tensor table, read in one pass that skips the arrays (a vocabulary's 150,000 token
strings, its merges and scores) instead of building them, as gguf-py's GGUFReader does (seconds
of CPU for a large vocabulary: too slow for the server's /api/show and /api/tags)."""

from __future__ import annotations

import json
import mmap
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_llm.errors import EdgeLLMError
from edge_llm.options import CommandParser
from edge_llm.registry import load_registry, resolve


@dataclass
class GGUFInfo:
    path: str
    file_size: int
    architecture: str
    name: str | None
    n_params: int
    n_layers: int | None
    context_length: int | None
    embedding_length: int | None
    file_type: str | None
    tensor_types: dict[str, int] = field(default_factory=dict)
    n_tensors: int = 0
    tensor_bytes: int = 0
    vocab_size: int | None = None
    tokenizer_model: str | None = None
    tokenizer_pre: str | None = None
    chat_format: str | None = None
    chat_template: str | None = None
    # general.type: "model", or "mmproj" for a projector (the vision/audio half llama.cpp's mtmd
    # loads beside a model; llama.cpp's older LLaVA converter wrote no type, only architecture "clip").
    kind: str = "model"
    projector: str | None = None  # a projector's clip.projector_type: gemma3, idefics3, qwen2.5vl_merger...
    image_size: int | None = None  # a vision projector's input size and patch size, in pixels
    patch_size: int | None = None
    projection_dim: int | None = None  # the embedding length of the language model it feeds (new files)
    images: str | None = None  # whether it takes images, and through which projector


def detect_chat_format(template: str | None) -> str | None:
    """A human name for a chat template, from the markers it writes."""
    if not template:
        return None
    markers = [("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama-3"), ("[INST]", "Llama-2/Mistral"),
               ("<reserved_106>", "Baichuan2"), ("<|assistant|>", "ChatGLM"), ("<start_of_turn>", "Gemma")]
    return next((name for marker, name in markers if marker in template), "custom")


# GGUF value types (gguf-py's GGUFValueType) -> struct format of a scalar; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A GGUF header read front to back; arrays are skipped, except their length."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.pos = 0
        if bytes(data[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = struct.unpack_from("<I", data, 4)
        self.order = "<" if version < 0x10000 else ">"  # a big-endian file reads as a huge version
        (version,) = struct.unpack_from(self.order + "I", data, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.pos = 8

    def read(self, fmt: str):  # noqa: ANN201
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.read("Q")
        if self.pos + n > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):  # noqa: ANN201
        if kind in _SCALARS:
            return self.read(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.read("I"), self.read("Q")
            if item in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item])
            elif item == _STRING:
                for _ in range(count):
                    self.pos += 8 + self.read("Q")
            else:
                raise ValueError(f"an array of value type {item} is not supported")
            if self.pos > len(self.data):
                raise ValueError("an array runs past the end of the file")
            return _Skipped(count)
        raise ValueError(f"unknown value type {kind}")


@dataclass(frozen=True)
class _Skipped:
    """An array value left unread: its length only."""

    length: int


def read_gguf_header(path: str | Path) -> tuple[dict, list[tuple[str, int, int]]]:
    """(metadata without the arrays' contents, [(tensor name, type, elements)]) of a GGUF file."""
    with open(path, "rb") as file:
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        header = _Header(data)
        n_tensors, n_kv = header.read("Q"), header.read("Q")
        if n_tensors > len(data) or n_kv > len(data):
            raise ValueError("impossible counts")
        metadata = {}
        for _ in range(n_kv):
            key = header.string()
            metadata[key] = header.value(header.read("I"))
        tensors = []
        for _ in range(n_tensors):
            name = header.string()
            n_dims = header.read("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            elements = 1
            for _ in range(n_dims):
                elements *= header.read("Q")
            kind = header.read("I")
            header.read("Q")  # offset
            tensors.append((name, kind, elements))
        return metadata, tensors
    finally:
        data.close()


def read_gguf_info(path: str | Path) -> GGUFInfo:
    import gguf

    path = Path(path)
    try:
        metadata, tensors = read_gguf_header(path)
    except (ValueError, OSError, struct.error, OverflowError) as exc:
        raise EdgeLLMError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key: str):  # noqa: ANN202
        found = metadata.get(key)
        return None if isinstance(found, _Skipped) else found

    arch = value("general.architecture") or "unknown"
    file_type = value("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    names, n_bytes = [], 0
    for _, kind, elements in tensors:
        try:
            quant = gguf.GGMLQuantizationType(kind)
        except ValueError:
            names.append(str(kind))
            continue
        names.append(quant.name)
        block, size = gguf.GGML_QUANT_SIZES[quant]
        n_bytes += elements // block * size
    template = value("tokenizer.chat_template")
    file_kind = value("general.type") or ("mmproj" if arch == "clip" else "model")
    projector = value("clip.projector_type") or value("clip.vision.projector_type") or \
        value("clip.audio.projector_type")
    prefix = "clip.vision" if file_kind == "mmproj" else arch
    tokens = metadata.get("tokenizer.ggml.tokens")
    return GGUFInfo(
        path=str(path), file_size=path.stat().st_size, architecture=arch, name=value("general.name"),
        n_params=sum(elements for _, _, elements in tensors),
        n_layers=value(f"{prefix}.block_count"), context_length=value(f"{arch}.context_length"),
        embedding_length=value(f"{prefix}.embedding_length"), file_type=file_type_name,
        tensor_types=dict(Counter(names).most_common()), n_tensors=len(tensors), tensor_bytes=n_bytes,
        vocab_size=tokens.length if isinstance(tokens, _Skipped) else None,
        tokenizer_model=value("tokenizer.ggml.model"), tokenizer_pre=value("tokenizer.ggml.pre"),
        chat_format=detect_chat_format(template), chat_template=template,
        kind=file_kind, projector=projector, image_size=value("clip.vision.image_size"),
        patch_size=value("clip.vision.patch_size"),
        # (llama.cpp's LLaVA converter wrote the CLIP tower's own projection size under this key)
        projection_dim=None if value("clip.has_llava_projector") else value("clip.vision.projection_dim"),
    )


def format_info(info: GGUFInfo, *, show_template: bool = False) -> str:
    rows = [
        ("file", f"{info.path} ({info.file_size / 2**20:.1f} MiB)"),
        ("name", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", f"{info.n_params / 1e6:.1f} M" if info.n_params < 1e9 else f"{info.n_params / 1e9:.2f} B"),
        ("layers", info.n_layers),
        ("context length", info.context_length),
        ("embedding length", info.embedding_length),
        ("file type", info.file_type or "-"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in info.tensor_types.items())),
        ("tensors", f"{info.n_tensors} ({info.tensor_bytes / 2**20:.1f} MiB)"),
        ("vocabulary", f"{info.vocab_size} tokens ({info.tokenizer_model}, pre: {info.tokenizer_pre or '-'})"),
        ("chat template", info.chat_format or "none"),
        *([("images", info.images)] if info.images else []),
    ]
    if info.kind == "mmproj":  # a projector has no vocabulary or template: say what it encodes instead
        what = "audio" if info.image_size is None else "vision"
        rows[2:] = [
            ("architecture", f"{info.architecture}: {what} projector (mmproj) for llama.cpp's mtmd"),
            ("projector", info.projector or "-"),
            *rows[3:5],
            ("image size", f"{info.image_size} px, {info.patch_size} px patches" if info.image_size else "-"),
            ("embedding length", info.embedding_length),
            ("projects to", info.projection_dim or "-"),
            *rows[7:10],
        ]
    text = "\n".join(f"{k:<17} {v}" for k, v in rows)
    if show_template and info.chat_template:
        text += "\n\n" + info.chat_template
    return text


def images_line(info: GGUFInfo, resolved) -> str:
    """Whether the model takes images: a projector file itself, or a model with one (--mmproj in
    its registry entry, or the one mmproj*.gguf beside it), or not."""
    from edge_llm.engines.projector import projector_path

    if info.architecture == "clip":
        return "this is a vision projector (mmproj): load it beside its model with --mmproj"
    try:
        found = projector_path(resolved.spec.mmproj, resolved.path)
    except EdgeLLMError as exc:
        return f"no ({exc})"
    return f"yes, with {found}" if found is not None else "no (no --mmproj projector beside it)"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="edge-llm info", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="a .gguf path, registry name or hf: reference")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--template", action="store_true", help="also print the chat template")
    args = parser.parse_args(argv)
    resolved = resolve(args.model, load_registry())
    if not resolved.is_gguf:
        raise EdgeLLMError(f"{resolved.path} is not a GGUF file")
    info = read_gguf_info(resolved.path)
    info.images = images_line(info, resolved)
    if args.json:
        data = asdict(info)
        if not args.template:
            data.pop("chat_template")
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(format_info(info, show_template=args.template))
    return 0
