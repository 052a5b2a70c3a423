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

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import gguf

from edge_llm.convert.baichuan import BaichuanModel
from edge_llm.convert.base import OUTTYPES, Model, write_gguf
from edge_llm.convert.checkpoint import CheckpointError, load_config, load_tensors
from edge_llm.convert.deepseek import DeepseekV2Model
from edge_llm.convert.gemma import Gemma2Model, Gemma3Model, GemmaModel
from edge_llm.convert.glm import ChatGLMModel, Glm4Model
from edge_llm.convert.gpt_oss import GptOssModel
from edge_llm.convert.internlm2 import InternLM2Model
from edge_llm.convert.lfm2 import LFM2Model
from edge_llm.convert.llama import (
    GraniteModel,
    InternLM3Model,
    LlamaModel,
    MixtralModel,
    Olmo2Model,
    SmolLM3Model,
)
from edge_llm.convert.others import Ernie45Model, MiniCPMModel, StarCoder2Model
from edge_llm.convert.phi3 import Phi3Model
from edge_llm.convert.qwen import Qwen2Model, Qwen2MoeModel, Qwen3Model, Qwen3MoeModel
from edge_llm.errors import EdgeLLMError, InvalidParameterError, MissingExtraError
from edge_llm.quantize import progress_printer, quant_types, quantize_file

__all__ = ["convert", "main", "ARCHITECTURES", "CheckpointError"]

logger = logging.getLogger(__name__)

FAMILIES: tuple[type[Model], ...] = (
    LlamaModel, MixtralModel, SmolLM3Model, GraniteModel, InternLM3Model, Olmo2Model,
    Qwen2Model, Qwen3Model, Qwen2MoeModel, Qwen3MoeModel,
    GemmaModel, Gemma2Model, Gemma3Model, Phi3Model,
    MiniCPMModel, StarCoder2Model, Ernie45Model, ChatGLMModel, Glm4Model, DeepseekV2Model,
    LFM2Model, GptOssModel,
    BaichuanModel, InternLM2Model,
)
ARCHITECTURES: dict[str, type[Model]] = {name: cls for cls in FAMILIES for name in cls.hf_architectures}


def tool_version() -> str:
    try:
        ours = version("edge-llm")
    except PackageNotFoundError:  # run from a source tree
        ours = "dev"
    return f"edge-llm {ours} (gguf-py {version('gguf')})"


def model_class(config: dict, hf_dir: Path) -> type[Model]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"none (model_type {config.get('model_type')!r})"
    raise CheckpointError(f"{hf_dir}: unsupported architecture {found}; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))} (others: --llama-cpp DIR, a llama.cpp checkout)")


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


def _metadata_writer(hf_dir: Path, outtype: str, quant: str | None) -> Callable[[gguf.GGUFWriter, int], None]:
    def add(w: gguf.GGUFWriter, total_params: int) -> None:
        meta = gguf.Metadata.load(None, hf_dir, None, total_params)
        meta.name = meta.name if meta.name and meta.name != hf_dir.name else _default_name(hf_dir)
        if meta.size_label is None and total_params > 0:
            meta.size_label = gguf.size_label(total_params, 0, 0, 0)
        w.add_type(gguf.GGUFType.MODEL)
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


def convert(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16", quant: str | None = None,
            *, threads: int | None = None, progress: Callable[[int, int, str], None] | None = None,
            llama_cpp_dir: str | Path | None = None, imatrix: str | Path | None = None) -> Path:
    """Convert an HF checkpoint folder to GGUF at `out` (default: ./NAME-TYPE.gguf) and return its path.

    `outtype` is the float type of the written tensors (f32, f16, bf16, q8_0); `quant` (any
    `edge-llm quantize` type, e.g. q5_k_m) then quantizes that file with llama.cpp and removes it.
    `llama_cpp_dir` (or $EDGE_LLM_LLAMA_CPP): a llama.cpp checkout whose converter handles the
    architectures this one does not. `imatrix`: an importance matrix file for the quantization, or
    "auto" to compute one from the converted file first (the types that need one get it anyway).
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
    config = load_config(hf_dir)
    llama_cpp_dir = llama_cpp_dir or os.environ.get("EDGE_LLM_LLAMA_CPP") or None
    try:
        cls = model_class(config, hf_dir)
    except CheckpointError:
        if not llama_cpp_dir:
            raise
        cls = None
    out = Path(out).expanduser() if out else Path.cwd() / f"{_default_name(hf_dir)}-{quant or outtype}.gguf"
    if out.is_dir():
        out = out / f"{_default_name(hf_dir)}-{quant or outtype}.gguf"
    if not out.parent.is_dir():
        raise EdgeLLMError(f"output folder does not exist: {out.parent}")

    tmp = _partial(out, f".{outtype}" if quant else "")
    try:
        if cls is None:
            upstream = _partial(out, ".llama-cpp")
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
        if quant:
            quantize_file(tmp, out, quant, threads=threads, imatrix=imatrix,
                          progress=(lambda i, n, name: progress(i, n, f"{quant}: {name}")) if progress else None)
        else:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-llm convert", description="Convert an HF checkpoint folder (safetensors or .bin) to GGUF.",
        epilog=f"supported architectures: {', '.join(sorted(ARCHITECTURES))}")
    parser.add_argument("hf_dir", help="the checkpoint folder (config.json, weights, tokenizer)")
    parser.add_argument("-o", "--outfile", default=None, help="output .gguf (default: ./NAME-TYPE.gguf)")
    parser.add_argument("--outtype", default="f16", choices=list(OUTTYPES), help="tensor type (default: f16)")
    parser.add_argument("--quant", default=None, help="then quantize with llama.cpp, e.g. q5_k_m, q4_k_m")
    parser.add_argument("--imatrix", default=None, metavar="FILE|auto",
                        help="with --quant: an importance matrix file, or auto to compute one from the converted "
                             "file first (`edge-llm imatrix`; the types that need one get it anyway)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="quantization threads (default: all)")
    parser.add_argument("--llama-cpp", default=None, metavar="DIR",
                        help="llama.cpp checkout whose convert_hf_to_gguf.py converts other architectures "
                             "(needs torch + transformers; default: $EDGE_LLM_LLAMA_CPP)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    show = not args.quiet and sys.stderr.isatty()
    out = convert(args.hf_dir, args.outfile, args.outtype, args.quant, threads=args.threads,
                  progress=progress_printer("converting") if show else None, llama_cpp_dir=args.llama_cpp,
                  imatrix=args.imatrix)
    print(out)
    return 0
