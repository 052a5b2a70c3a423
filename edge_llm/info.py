"""`edge-llm info FILE.gguf`: what is inside a GGUF, read with the official `gguf` package
(metadata only: the weights are memory-mapped, not loaded)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_llm.errors import EdgeLLMError
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
    images: str | None = None  # whether it takes images, and through which projector


def detect_chat_format(template: str | None) -> str | None:
    """A human name for a chat template, from the markers it writes."""
    if not template:
        return None
    markers = [("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama-3"), ("[INST]", "Llama-2/Mistral"),
               ("<reserved_106>", "Baichuan2"), ("<|assistant|>", "ChatGLM"), ("<start_of_turn>", "Gemma")]
    return next((name for marker, name in markers if marker in template), "custom")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise EdgeLLMError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = value("general.architecture") or "unknown"
    file_type = value("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    template = value("tokenizer.chat_template")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GGUFInfo(
        path=str(path), file_size=path.stat().st_size, architecture=arch, name=value("general.name"),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_layers=value(f"{arch}.block_count"), context_length=value(f"{arch}.context_length"),
        embedding_length=value(f"{arch}.embedding_length"), file_type=file_type_name,
        tensor_types=dict(types.most_common()), n_tensors=len(reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        vocab_size=len(tokens.data) if tokens is not None else None,
        tokenizer_model=value("tokenizer.ggml.model"), tokenizer_pre=value("tokenizer.ggml.pre"),
        chat_format=detect_chat_format(template), chat_template=template,
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
    parser = argparse.ArgumentParser(prog="edge-llm info", description=__doc__.splitlines()[0])
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
