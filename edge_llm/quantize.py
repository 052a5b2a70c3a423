"""`edge-llm quantize`: GGUF -> quantized GGUF through llama.cpp's own quantizer
(`llama_model_quantize`, the code behind `llama-quantize`), so the output is byte-for-byte what
llama-quantize writes.

    edge-llm quantize model-f16.gguf q5_k_m                 # -> model-q5_k_m.gguf
    edge-llm quantize model-f16.gguf iq2_xs --imatrix imatrix.gguf -o small.gguf
"""

from __future__ import annotations

import argparse
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

# llama.cpp refuses these without an importance matrix ("this quantization requires an imatrix").
NEEDS_IMATRIX = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s"}
# llama_ftype names the binding exposes that llama.cpp's quantizer rejects as a target.
_NOT_TARGETS = {"nvfp4"}
_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


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
    try:
        with log_to(_progress_reader(progress, verbose)):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0:
            raise EdgeLLMError(f"llama.cpp could not quantize {src} to {qtype} (status {status}; "
                               "run with -v for llama.cpp's log)")
        with os_errors(dst, "write"):
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _progress_reader(progress: Callable[[int, int, str], None] | None, verbose: bool) -> Callable[[bytes], None]:
    """llama.cpp's log while quantizing: each "[ 12/272] blk.1.attn_q.weight" line is progress
    (llama_model_quantize has no progress callback); the log itself is printed only when verbose
    (llama-cpp-python's own callback lets continuation lines of warnings through even when quiet)."""

    def read(text: bytes) -> None:
        match = _PROGRESS.search(text)
        if match and progress is not None:
            progress(int(match[1]), int(match[2]), match[3].decode(errors="replace"))
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
    """model-f16.gguf -> model-q5_k_m.gguf; other names get the type appended."""
    stem = re.sub(r"[-_.](f32|f16|bf16|q8_0)$", "", src.stem, flags=re.IGNORECASE)
    return src.with_name(f"{stem}-{qtype.lower()}.gguf")


def progress_printer(verb: str) -> Callable[[int, int, str], None]:
    """A one-line progress display on stderr ("quantizing [12/272] blk.1.attn_q.weight")."""

    def show(done: int, total: int, name: str) -> None:
        print(f"\r{verb} [{done}/{total}] {name:<40.40}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    types = quant_types()
    parser = argparse.ArgumentParser(
        prog="edge-llm quantize", description="Quantize a GGUF file with llama.cpp's own quantizer.",
        epilog="types: " + ", ".join(sorted(types)) + f". Types needing --imatrix: {', '.join(sorted(NEEDS_IMATRIX))}.")
    parser.add_argument("input", help="the GGUF to quantize (usually f16, bf16 or f32)")
    parser.add_argument("type", help="quant type, e.g. q4_k_m, q5_k_m, q8_0, iq4_xs")
    parser.add_argument("-o", "--outfile", default=None,
                        help="output .gguf, or a folder for the default name (default: INPUT-TYPE.gguf beside it)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core)")
    parser.add_argument("--imatrix", default=None, help="importance matrix from llama-imatrix (GGUF or .dat)")
    parser.add_argument("--allow-requantize", action="store_true", help="allow an already-quantized input")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"invalid threads: {args.threads} (must be >= 1)", param="threads")
    src = Path(args.input).expanduser()
    dst = Path(args.outfile).expanduser() if args.outfile else default_output(src, args.type)
    show = not args.quiet and not args.verbose and sys.stderr.isatty()
    dst = quantize_file(src, dst, args.type, threads=args.threads, allow_requantize=args.allow_requantize,
                        verbose=args.verbose, imatrix=args.imatrix,
                        progress=progress_printer("quantizing") if show else None)
    print(dst)
    return 0
