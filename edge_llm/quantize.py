"""`edge-llm quantize`: GGUF -> quantized GGUF through llama.cpp's own quantizer
(`llama_model_quantize`, the code behind `llama-quantize`), so the output is byte-for-byte what
llama-quantize writes.

    edge-llm quantize model-f16.gguf q5_k_m                 # -> model-q5_k_m.gguf
    edge-llm quantize model-f16.gguf iq2_xs --imatrix imatrix.gguf -o small.gguf
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.files import check_output_path, os_errors
from edge_llm.options import CommandParser

# llama.cpp refuses these without an importance matrix ("this quantization requires an imatrix").
NEEDS_IMATRIX = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s"}
# llama_ftype names the binding exposes that llama.cpp's quantizer rejects as a target.
_NOT_TARGETS = {"nvfp4"}
_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FAILED = re.compile(rb"failed to quantize: ([^\n]+)")


def quant_types() -> dict[str, int]:
    """Quant name (lower case, as llama-quantize spells it) -> llama_ftype."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):].lower(): getattr(llama_cpp, name) for name in dir(llama_cpp)
             if name.startswith(prefix) and name[len(prefix):].lower() not in _NOT_TARGETS}
    types["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


def quantize_file(src: str | Path, dst: str | Path, qtype: str, *, threads: int | None = None,
                  allow_requantize: bool = False, verbose: bool = False, imatrix: str | Path | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Quantize `src` into `dst` (a folder: the default name in it). The output is written to a
    temporary name in the target folder and renamed when complete, so a failure never leaves a
    half file under `dst`.

    `imatrix`: an importance matrix from llama-imatrix (GGUF or legacy .dat); `progress(done, total,
    tensor)` is called as llama.cpp reports each tensor."""
    from edge_llm.engines.llama_log import log_to, set_verbose
    from edge_llm.engines.llama_runtime import check_gguf_file, init_backend, llama_cpp

    src, dst = Path(src), Path(dst)
    types = quant_types()
    ftype = types.get(qtype.lower())
    if ftype is None:
        raise InvalidParameterError(f"unknown quant type {qtype!r}; choose from {', '.join(sorted(types))}",
                                    param="type")
    if not src.is_file():
        raise EdgeLLMError(f"input file not found: {src}")
    if qtype.lower() in NEEDS_IMATRIX and imatrix is None:
        raise InvalidParameterError(f"{qtype} needs an importance matrix: pass --imatrix FILE "
                                    "(made by llama-imatrix)", param="imatrix")
    check_gguf_file(src)
    if dst.is_dir():
        dst = dst / default_output(src, qtype).name
    if dst.resolve() == src.resolve():
        raise InvalidParameterError("the output would overwrite the input; name another (-o)", param="outfile")
    check_output_path(dst)
    set_verbose(verbose)  # llama.cpp logs every tensor otherwise
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    params.allow_requantize = allow_requantize
    keep_alive = []
    if imatrix is not None:
        entries = load_imatrix(Path(imatrix))
        keep_alive = _imatrix_array(entries)
        params.imatrix = keep_alive[0]
    tmp = dst.with_name(f".{dst.name}.partial")
    failures: list[str] = []
    try:
        with log_to(_progress_reader(progress, verbose, failures)):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0:
            raise EdgeLLMError(_failure_line(src, qtype, status, failures[-1] if failures else None))
        with os_errors(dst, "write"):
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _failure_line(src: Path, qtype: str, status: int, reason: str | None) -> str:
    if reason is not None and "requantizing" in reason:  # llama.cpp: "requantizing from type q4_1 is disabled"
        return (f"{src} is already quantized ({reason.split('from type ')[-1].split()[0]}); quantizing it again "
                "loses more quality than quantizing its f16/bf16 original: pass --allow-requantize to do it anyway")
    return f"llama.cpp could not quantize {src} to {qtype}: " + (reason or f"status {status}; run with -v for its log")


def _progress_reader(progress: Callable[[int, int, str], None] | None, verbose: bool,
                     failures: list[str]) -> Callable[[bytes], None]:
    """llama.cpp's log while quantizing: each "[ 12/272] blk.1.attn_q.weight" line is progress
    (llama_model_quantize has no progress callback), a "failed to quantize: WHY" line goes to
    `failures` (the status code alone says nothing); the log itself is printed only when verbose
    (llama-cpp-python's own callback lets continuation lines of warnings through even when quiet)."""

    def read(text: bytes) -> None:
        match = _PROGRESS.search(text)
        if match and progress is not None:
            progress(int(match[1]), int(match[2]), match[3].decode(errors="replace"))
        failed = _FAILED.search(text)
        if failed:
            failures.append(failed[1].decode(errors="replace").strip())
        if verbose:
            print(text.decode(errors="replace"), end="", file=sys.stderr, flush=True)

    return read


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """tensor name -> mean squared activations, as llama-quantize computes them from an imatrix file:
    the GGUF format (`NAME.in_sum2` / `NAME.counts`) or the legacy binary .dat."""
    if not path.is_file():
        raise EdgeLLMError(f"imatrix file not found: {path}")
    try:
        with os_errors(path, "read"):
            with open(path, "rb") as f:
                magic = f.read(4)
            return _load_gguf_imatrix(path) if magic == b"GGUF" else _load_legacy_imatrix(path)
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
        raise EdgeLLMError(f"{path}: not a valid imatrix file ({exc})") from None


def _load_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors[base + ".counts"].reshape(-1)
        sums = sums.reshape(len(counts), -1)
        out[base] = np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1), 1.0).reshape(-1)
    if not out:
        raise ValueError("no *.in_sum2 tensors")
    return out


def _load_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (n_entries,), pos, out = struct.unpack_from("<i", data, 0), 4, {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4: pos + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        pos += 12 + length
        values = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).copy()
        pos += 4 * nval
        out[name] = values / ncall if ncall > 0 else values
    if not out:
        raise ValueError("no entries")
    return out


def _imatrix_array(entries: dict[str, np.ndarray]) -> list:
    """A NULL-terminated C array of llama_model_imatrix_data, and everything it points into."""
    import llama_cpp

    names = [name.encode() for name in entries]
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in entries.values()]
    table = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (name, values) in enumerate(zip(names, arrays, strict=True)):
        table[i].name = name
        table[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = values.size
    return [table, names, arrays]


def default_output(src: Path, qtype: str) -> Path:
    """model-f16.gguf -> model-q5_k_m.gguf (model.Q4_1.gguf -> model-q8_0.gguf: the type the name
    gives is replaced); other names get the type appended."""
    known = "|".join(sorted(map(re.escape, quant_types()), key=len, reverse=True))
    stem = re.sub(rf"[-_.]({known})$", "", src.stem, flags=re.IGNORECASE)
    return src.with_name(f"{stem}-{qtype.lower()}.gguf")


def input_gguf(ref: str, config: str | None = None) -> tuple[Path, bool]:
    """The GGUF to quantize: a path as given, else a model reference (registry name, hf:/ms:)
    resolved offline; and whether it was a reference (its output then goes to the current folder,
    not beside it in a package or hub cache)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path, False
    from edge_llm.registry import load_registry, resolve

    resolved = resolve(ref, load_registry(config))
    if not resolved.is_gguf:
        raise EdgeLLMError(f"{ref} is an HF checkpoint ({resolved.path}), not a GGUF: "
                           f"edge-llm convert {ref} --quant TYPE")
    return resolved.path, True


def progress_printer(verb: str) -> Callable[[int, int, str], None]:
    """A one-line progress display on stderr ("quantizing [12/272] blk.1.attn_q.weight")."""

    def show(done: int, total: int, name: str) -> None:
        print(f"\r{verb} [{done}/{total}] {name:<40.40}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    types = quant_types()
    parser = CommandParser(
        prog="edge-llm quantize", description="Quantize a GGUF file with llama.cpp's own quantizer.",
        epilog="types: " + ", ".join(sorted(types)) + f". Types needing --imatrix: {', '.join(sorted(NEEDS_IMATRIX))}.")
    parser.add_argument("input", help="the GGUF to quantize (usually f16, bf16 or f32): a path or a model reference "
                                      "(registry name, hf:...)")
    parser.add_argument("out_type", nargs="+", metavar="[OUT] TYPE",
                        help="quant type, e.g. q4_k_m, q5_k_m, q8_0, iq4_xs; before it, the output as llama-quantize "
                             "takes it (or -o)")
    parser.add_argument("-o", "--outfile", default=None,
                        help="output .gguf, or a folder for the default name (default: INPUT-TYPE.gguf beside a "
                             "path, in the current folder for a model reference)")
    parser.add_argument("--config", default=None, help="a models.toml to add to the built-in registry")
    parser.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core)")
    parser.add_argument("--imatrix", default=None, help="importance matrix from llama-imatrix (GGUF or .dat)")
    parser.add_argument("--allow-requantize", action="store_true", help="allow an already-quantized input")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args(argv)
    if len(args.out_type) > 2 or (len(args.out_type) == 2 and args.outfile):
        parser.error("expected INPUT [OUT] TYPE, with OUT either there or as -o")
    *out, qtype = args.out_type
    outfile = out[0] if out else args.outfile
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"invalid threads: {args.threads} (must be >= 1)", param="threads")
    src, is_reference = input_gguf(args.input, args.config)
    default = default_output(src, qtype)
    dst = Path(outfile).expanduser() if outfile else Path(default.name) if is_reference else default
    show = not args.quiet and not args.verbose and sys.stderr.isatty()
    dst = quantize_file(src, dst, qtype, threads=args.threads, allow_requantize=args.allow_requantize,
                        verbose=args.verbose, imatrix=args.imatrix,
                        progress=progress_printer("quantizing") if show else None)
    print(dst)
    return 0
