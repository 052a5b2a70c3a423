"""`edge-llm convert`: an HF checkpoint folder -> a GGUF file, without torch or transformers.

    edge-llm convert ./Qwen2-0.5B -o qwen2-0.5b-f16.gguf
    edge-llm convert ./Llama-3-8B --quant q5_k_m      # convert to f16, quantize, drop the f16
    edge-llm convert ./Llama-3-8B --quant iq4_xs --imatrix auto   # importance matrix of the f16 first

Safetensors are memory-mapped and written tensor by tensor through gguf-py (GGUFWriter, tensor name
maps, SpecialVocab); quantization to llama.cpp's types goes through `edge_llm.quantize` (llama.cpp's
own quantizer). The output is written to a hidden temporary name in the target folder and renamed
when complete: an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import gguf

from edge_llm.convert.baichuan import BaichuanModel
from edge_llm.convert.base import OUTTYPES, Model, write_gguf
from edge_llm.convert.bert import BertModel, NomicBertModel, XLMRobertaModel
from edge_llm.convert.checkpoint import CheckpointError, load_tensors, read_config, text_model_config
from edge_llm.convert.deepseek import DeepseekV2Model
from edge_llm.convert.gemma import Gemma2Model, Gemma3Model, Gemma3Projector, GemmaModel
from edge_llm.convert.glm import ChatGLMModel, Glm4Model
from edge_llm.convert.gpt_oss import GptOssModel
from edge_llm.convert.internlm2 import InternLM2Model
from edge_llm.convert.internvl import InternVLProjector
from edge_llm.convert.lfm2 import LFM2Model
from edge_llm.convert.llama import (
    GraniteModel,
    InternLM3Model,
    LlamaModel,
    MixtralModel,
    Olmo2Model,
    SmolLM3Model,
)
from edge_llm.convert.llava import LlavaProjector
from edge_llm.convert.mmproj import Projector
from edge_llm.convert.others import Ernie45Model, MiniCPMModel, StarCoder2Model
from edge_llm.convert.phi3 import Phi3Model
from edge_llm.convert.qwen import Qwen2Model, Qwen2MoeModel, Qwen3Model, Qwen3MoeModel
from edge_llm.convert.qwenvl import Qwen2VLModel, Qwen2VLProjector
from edge_llm.convert.smolvlm import Idefics3Projector
from edge_llm.errors import EdgeLLMError, InvalidParameterError, MissingExtraError
from edge_llm.options import CommandParser
from edge_llm.quantize import progress_printer, quant_types, quantize_file

__all__ = ["convert", "convert_checkpoint", "convert_mmproj", "Converted", "main", "ARCHITECTURES", "PROJECTORS",
           "CheckpointError"]

logger = logging.getLogger(__name__)

FAMILIES: tuple[type[Model], ...] = (
    LlamaModel, MixtralModel, SmolLM3Model, GraniteModel, InternLM3Model, Olmo2Model,
    Qwen2Model, Qwen3Model, Qwen2MoeModel, Qwen3MoeModel, Qwen2VLModel,
    GemmaModel, Gemma2Model, Gemma3Model, Phi3Model,
    MiniCPMModel, StarCoder2Model, Ernie45Model, ChatGLMModel, Glm4Model, DeepseekV2Model,
    LFM2Model, GptOssModel,
    BaichuanModel, InternLM2Model,
    BertModel, XLMRobertaModel, NomicBertModel,
)
ARCHITECTURES: dict[str, type[Model]] = {name: cls for cls in FAMILIES for name in cls.hf_architectures}
# The vision halves written as llama.cpp's projector GGUF (`mmproj`), by the checkpoint's architecture.
PROJECTOR_FAMILIES: tuple[type[Projector], ...] = (
    Gemma3Projector, Idefics3Projector, Qwen2VLProjector, LlavaProjector, InternVLProjector,
)
PROJECTORS: dict[str, type[Projector]] = {name: cls for cls in PROJECTOR_FAMILIES for name in cls.hf_architectures}


def tool_version() -> str:
    try:
        ours = version("edge-llm")
    except PackageNotFoundError:  # run from a source tree
        ours = "dev"
    return f"edge-llm {ours} (gguf-py {version('gguf')})"


def model_class(config: dict, hf_dir: Path) -> type[Model]:
    return _converter_for(config, hf_dir, ARCHITECTURES, "unsupported architecture",
                          "others: --llama-cpp DIR, a llama.cpp checkout")


def has_vision(config: dict) -> bool:
    """Whether config.json (as on disk) describes a vision-language checkpoint."""
    return isinstance(config.get("vision_config"), dict)


def projector_class(config: dict, hf_dir: Path) -> type[Projector]:
    return _converter_for(config, hf_dir, PROJECTORS, "no projector converter for architecture",
                          "--no-mmproj converts the language model alone")


def _converter_for(config: dict, hf_dir: Path, table: dict, refusal: str, hint: str):
    """The converter class for the first of config.json's architectures that `table` has."""
    names = config.get("architectures") or []
    for name in names:
        if name in table:
            return table[name]
    found = ", ".join(names) or f"none (model_type {config.get('model_type')!r})"
    raise CheckpointError(f"{hf_dir}: {refusal} {found}; supported: {', '.join(sorted(table))} ({hint})")


def supported_architecture(name: str) -> bool:
    """Whether `edge-llm convert` converts a checkpoint whose config.json names `name` (a language
    model, or a vision-language wrapper whose language model it then finds in text_config)."""
    return name in ARCHITECTURES or name in PROJECTORS


def source_repo(hf_dir: Path) -> str | None:
    """`org/name` when the folder is a snapshot in the Hugging Face or ModelScope cache."""
    parts = hf_dir.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return None


def _default_name(hf_dir: Path) -> str:
    repo = source_repo(hf_dir)
    return repo.split("/")[-1] if repo else hf_dir.resolve().name


def _metadata_writer(hf_dir: Path, outtype: str, quant: str | None,
                     kind: str = gguf.GGUFType.MODEL) -> Callable[[gguf.GGUFWriter, int], None]:
    def add(w: gguf.GGUFWriter, total_params: int) -> None:
        meta = gguf.Metadata.load(None, hf_dir, None, total_params)
        meta.name = meta.name if meta.name and meta.name != hf_dir.name else _default_name(hf_dir)
        if meta.size_label is None and total_params > 0:
            meta.size_label = gguf.size_label(total_params, 0, 0, 0)
        w.add_type(kind)
        repo = source_repo(hf_dir)
        if repo and not meta.source_repo_url:
            meta.source_repo_url = f"https://huggingface.co/{repo}"
        meta.set_gguf_meta_model(w)
        w.add_string("edge_llm.converter", tool_version())
        w.add_string("edge_llm.quant", quant or outtype)

    return add


def _partial(path: Path, tag: str = "") -> Path:
    return path.with_name(f".{path.name}{tag}.partial")


def convert_with_llama_cpp(llama_cpp_dir: Path, hf_dir: Path, out: Path, outtype: str) -> None:
    """The fallback for architectures this converter does not know: llama.cpp's own
    convert_hf_to_gguf.py from a checkout the user points at, run as a subprocess in this Python
    (it needs torch and transformers there)."""
    script = Path(llama_cpp_dir).expanduser() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise EdgeLLMError(f"{llama_cpp_dir}: no convert_hf_to_gguf.py (expected a llama.cpp checkout)")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} (needed by llama.cpp's converter)", "hf")
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeLLMError(f"llama.cpp's converter failed (exit {result.returncode}): {last}")


def copy_with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """`src` rewritten to `dst` with string keys added (tensors copied from the memory-mapped file)."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(dst, arch.contents() if arch else "llama")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in extra:
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for key, value in extra.items():
        writer.add_string(key, value)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data)
    finally:
        writer.close()


def _output_path(out: str | Path | None, hf_dir: Path, name: str) -> Path:
    """`out` (a file, a folder, or None for the current folder) with `name` as the default file name."""
    path = Path(out).expanduser() if out else Path.cwd() / name
    if path.is_dir():
        path = path / name
    if not path.parent.is_dir():
        raise EdgeLLMError(f"output folder does not exist: {path.parent}")
    return path


def mmproj_name(hf_dir: Path, outtype: str) -> str:
    """The projector's default file name, llama.cpp's `mmproj-` prefix on NAME-TYPE.gguf."""
    return f"mmproj-{_default_name(hf_dir)}-{outtype}.gguf"


@dataclass
class Converted:
    """What `convert_checkpoint` wrote: the language model's GGUF and the projector's (None: not written)."""

    text: Path | None
    mmproj: Path | None


def convert_checkpoint(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16",
                       quant: str | None = None, *, text: bool = True, mmproj: bool | None = None,
                       mmproj_out: str | Path | None = None, threads: int | None = None,
                       progress: Callable[[int, int, str], None] | None = None,
                       llama_cpp_dir: str | Path | None = None, imatrix: str | Path | None = None) -> Converted:
    """Convert an HF checkpoint folder: the language model to `out` (default ./NAME-TYPE.gguf) and, for
    a vision-language checkpoint, its vision tower and projector to `mmproj_out` (default
    mmproj-NAME-TYPE.gguf beside the language model's file), the file llama.cpp's mtmd loads.

    `mmproj`: None writes the projector when the checkpoint has one, True requires it, False skips
    it; `text=False` writes only the projector. The projector is written at `outtype` (f16 by
    default) even when `quant` quantizes the language model: llama.cpp quantizes no projector.
    Both files are written under temporary names and renamed only when both are complete.
    `imatrix`: an importance matrix file for the quantization, or "auto" to compute one from the
    converted file first (the types that need one get it anyway).
    """
    hf_dir = Path(hf_dir).expanduser()
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InvalidParameterError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}",
                                    param="outtype")
    if quant is not None:
        quant = quant.lower()
        if quant not in quant_types():
            raise InvalidParameterError(f"unknown quant type {quant!r}; see `edge-llm quantize -h`", param="quant")
    elif imatrix is not None:
        raise InvalidParameterError("--imatrix is for --quant TYPE", param="imatrix")
    if imatrix is not None and str(imatrix) != "auto" and not Path(imatrix).is_file():
        raise EdgeLLMError(f"imatrix file not found: {imatrix}")
    if not text and mmproj is False:
        raise InvalidParameterError("nothing to write: neither the language model nor the projector", param="mmproj")
    raw = read_config(hf_dir)
    config = text_model_config(raw)
    llama_cpp_dir = llama_cpp_dir or os.environ.get("EDGE_LLM_LLAMA_CPP") or None
    projector = None
    if mmproj is not False and has_vision(raw):
        projector = projector_class(raw, hf_dir)  # a vision half this converter does not know is an error
    if mmproj and projector is None:
        raise CheckpointError(f"{hf_dir}: no vision_config in config.json, so there is no projector to write")
    cls = None
    if text:
        try:
            cls = model_class(config, hf_dir)
        except CheckpointError:
            if not llama_cpp_dir:
                raise
    text_out = _output_path(out, hf_dir, f"{_default_name(hf_dir)}-{quant or outtype}.gguf") if text else None
    mm_out = None
    if projector is not None:
        if mmproj_out is None and text_out is not None:
            mmproj_out = text_out.parent
        mm_out = _output_path(mmproj_out if text else (mmproj_out or out), hf_dir, mmproj_name(hf_dir, outtype))
        if mm_out == text_out:
            raise EdgeLLMError(f"the projector and the language model would both be written to {mm_out}")

    temporaries: list[Path] = []
    try:
        mm_tmp = None
        if projector is not None:
            # First: small, and a checkpoint whose vision half is incomplete fails before the long part.
            mm_tmp = _partial(mm_out)
            temporaries.append(mm_tmp)
            model = projector(hf_dir, raw, load_tensors(hf_dir))
            write_gguf(model, mm_tmp, outtype, _metadata_writer(hf_dir, outtype, None, gguf.GGUFType.MMPROJ),
                       (lambda i, n, name: progress(i, n, f"mmproj: {name}")) if progress else None)
        text_tmp = None
        if text_out is not None:
            text_tmp = _partial(text_out, f".{outtype}" if quant else "")
            temporaries.append(text_tmp)
            _write_text(cls, hf_dir, config, text_tmp, outtype, quant, progress, llama_cpp_dir)
            if quant:
                final = _partial(text_out, f".{quant}")
                temporaries.append(final)
                quantize_file(text_tmp, final, quant, threads=threads, imatrix=imatrix,
                              progress=(lambda i, n, name: progress(i, n, f"{quant}: {name}")) if progress else None)
                text_tmp = final
        if text_tmp is not None:
            os.replace(text_tmp, text_out)
        if mm_tmp is not None:
            os.replace(mm_tmp, mm_out)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    return Converted(text_out, mm_out)


def _write_text(cls: type[Model] | None, hf_dir: Path, config: dict, tmp: Path, outtype: str, quant: str | None,
                progress: Callable[[int, int, str], None] | None, llama_cpp_dir: str | Path | None) -> None:
    """The language model at `outtype` to `tmp`: by this converter, or by llama.cpp's (`cls` None)."""
    if cls is None:
        upstream = _partial(tmp, ".llama-cpp")
        try:
            convert_with_llama_cpp(Path(llama_cpp_dir), hf_dir, upstream, outtype)
            copy_with_metadata(upstream, tmp, {"edge_llm.converter": f"llama.cpp convert_hf_to_gguf.py via "
                                                                    f"{tool_version()}",
                                               "edge_llm.quant": quant or outtype})
        finally:
            upstream.unlink(missing_ok=True)
    else:
        model = cls(hf_dir, config, load_tensors(hf_dir))
        write_gguf(model, tmp, outtype, _metadata_writer(hf_dir, outtype, quant), progress)


def convert(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16", quant: str | None = None,
            *, threads: int | None = None, progress: Callable[[int, int, str], None] | None = None,
            llama_cpp_dir: str | Path | None = None, imatrix: str | Path | None = None) -> Path:
    """Convert an HF checkpoint folder's language model to GGUF at `out` (default: ./NAME-TYPE.gguf)
    and return its path (`convert_checkpoint` writes a vision checkpoint's projector too).

    `outtype` is the float type of the written tensors (f32, f16, bf16, q8_0); `quant` (any
    `edge-llm quantize` type, e.g. q5_k_m) then quantizes that file with llama.cpp and removes it.
    `llama_cpp_dir` (or $EDGE_LLM_LLAMA_CPP): a llama.cpp checkout whose converter handles the
    architectures this one does not.
    """
    return convert_checkpoint(hf_dir, out, outtype, quant, mmproj=False, threads=threads, progress=progress,
                              llama_cpp_dir=llama_cpp_dir, imatrix=imatrix).text


def convert_mmproj(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16", *,
                   progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write only the projector GGUF of a vision-language checkpoint (default ./mmproj-NAME-TYPE.gguf)."""
    return convert_checkpoint(hf_dir, None, outtype, text=False, mmproj=True, mmproj_out=out,
                              progress=progress).mmproj


def checkpoint_folder(ref: str, config: str | None = None) -> Path:
    """A model reference (hf:/ms:, a registry name) resolved offline to the pulled checkpoint it
    names; anything else is a folder (load_config says what is wrong with one that is not)."""
    from edge_llm import hub
    from edge_llm.registry import load_registry, resolve

    path = Path(ref).expanduser()
    registry = load_registry(config)
    if path.exists() or not (hub.is_hub_ref(ref) or ref in registry):
        return path
    resolved = resolve(ref, registry)
    if resolved.is_gguf:
        raise EdgeLLMError(f"{ref} is a GGUF already ({resolved.path}); convert reads HF checkpoints "
                           f"(edge-llm quantize {ref} TYPE requantizes it)")
    return resolved.path


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="edge-llm convert", description="Convert an HF checkpoint folder (safetensors or .bin) to GGUF. "
        "A vision-language checkpoint gives two files: the language model, and its vision tower and projector "
        "(mmproj-NAME-TYPE.gguf beside it, the file llama.cpp's mtmd and `edge-llm serve --mmproj` load).",
        epilog=f"supported architectures: {', '.join(sorted(ARCHITECTURES))}; "
               f"projectors: {', '.join(sorted(PROJECTORS))}")
    parser.add_argument("hf_dir", metavar="CHECKPOINT",
                        help="the checkpoint folder (config.json, weights, tokenizer), or a model reference to a "
                             "pulled one (registry name such as qwen3-0.6b-hf, hf:ORG/REPO)")
    parser.add_argument("--config", default=None, help="a models.toml to add to the built-in registry")
    parser.add_argument("-o", "--outfile", default=None,
                        help="output .gguf or folder (default: ./NAME-TYPE.gguf; with --mmproj-only, the projector's)")
    parser.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                        help="tensor type (default: f16; the projector's too)")
    parser.add_argument("--quant", default=None,
                        help="then quantize the language model with llama.cpp, e.g. q5_k_m, q4_k_m (not the projector)")
    parser.add_argument("--imatrix", default=None, metavar="FILE|auto",
                        help="with --quant: an importance matrix file, or auto to compute one from the converted "
                             "file first (`edge-llm imatrix`; the types that need one get it anyway)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="quantization threads (default: all)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-mmproj", action="store_true", help="vision checkpoints: only the language model")
    which.add_argument("--mmproj-only", action="store_true", help="vision checkpoints: only the projector")
    parser.add_argument("--mmproj-outfile", default=None, metavar="FILE",
                        help="the projector's .gguf or folder (default: mmproj-NAME-TYPE.gguf beside the language model)")
    parser.add_argument("--llama-cpp", default=None, metavar="DIR",
                        help="llama.cpp checkout whose convert_hf_to_gguf.py converts other architectures "
                             "(needs torch + transformers; default: $EDGE_LLM_LLAMA_CPP)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    show = not args.quiet and sys.stderr.isatty()
    if args.mmproj_only and args.mmproj_outfile and args.outfile:
        raise InvalidParameterError("--mmproj-only writes one file: give -o or --mmproj-outfile, not both",
                                    param="mmproj-outfile")
    done = convert_checkpoint(
        checkpoint_folder(args.hf_dir, args.config), None if args.mmproj_only else args.outfile, args.outtype, args.quant,
        text=not args.mmproj_only, mmproj=False if args.no_mmproj else (True if args.mmproj_only else None),
        mmproj_out=(args.mmproj_outfile or args.outfile) if args.mmproj_only else args.mmproj_outfile,
        threads=args.threads, progress=progress_printer("converting") if show else None,
        llama_cpp_dir=args.llama_cpp, imatrix=args.imatrix)
    for path in (done.text, done.mmproj):
        if path is not None:
            print(path)
    return 0
