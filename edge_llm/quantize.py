"""`edge-llm quantize`: GGUF -> quantized GGUF through llama.cpp's own quantizer
(`llama_model_quantize`, the code behind `llama-quantize`), so the output is byte-for-byte what
llama-quantize writes.

    edge-llm quantize model-f16.gguf q5_k_m                 # -> model-q5_k_m.gguf
    edge-llm quantize model-f16.gguf iq2_xs --imatrix imatrix.gguf -o small.gguf
    edge-llm quantize model-f16.gguf q4_k_m --imatrix auto  # computed first (edge-llm imatrix)
    edge-llm quantize model-f16.gguf q4_k_m --tensor-type 'ffn_down=q6_k' --output-tensor-type q8_0

An importance matrix is given to llama.cpp as llama-quantize gives it (each weight's mean squared
activations, with the file, dataset, entry and chunk counts recorded in the output's metadata), so a
quant made here with a file is the file llama-quantize makes with it. Types that cannot be made
without one (iq2_xs ...) get one computed from the input (`--imatrix auto`) rather than an error.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
AUTO = "auto"  # --imatrix auto: computed from the input first
# llama-quantize's metadata keys for the importance matrix it was given (tools/quantize/quantize.cpp).
_IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                 "quantize.imatrix.chunks_count")


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
                  tensor_types: Sequence[str] = (), output_tensor_type: str | None = None,
                  token_embedding_type: str | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Quantize `src` into `dst` (a folder: the default name in it). The output is written to a
    temporary name in the target folder and renamed when complete, so a failure never leaves a
    half file under `dst`.

    `imatrix`: an importance matrix file (edge-llm imatrix / llama-imatrix, GGUF or legacy .dat), or
    "auto" to compute one from `src` with the shipped calibration text (the default for the types
    that need one); `tensor_types`: llama-quantize's --tensor-type overrides, "REGEX=TYPE" each;
    `output_tensor_type` / `token_embedding_type`: ggml type names for those two tensors;
    `progress(done, total, tensor)` is called as llama.cpp reports each tensor."""
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
    overrides = [parse_tensor_type(text) for text in tensor_types]
    output_type = ggml_type_id(output_tensor_type, "output-tensor-type") if output_tensor_type else None
    embedding_type = ggml_type_id(token_embedding_type, "token-embedding-type") if token_embedding_type else None
    if imatrix is None and qtype.lower() in NEEDS_IMATRIX:
        imatrix = AUTO
    check_gguf_file(src)
    if dst.is_dir():
        dst = dst / default_output(src, qtype).name
    if dst.resolve() == src.resolve():
        raise InvalidParameterError("the output would overwrite the input; name another (-o)", param="outfile")
    check_output_path(dst)
    given = load_imatrix(Path(imatrix)) if imatrix is not None and str(imatrix) != AUTO else None
    auto_file = dst.with_name(f".{dst.name}.imatrix.gguf")
    tmp = dst.with_name(f".{dst.name}.partial")
    failures: list[str] = []
    try:
        if imatrix is not None and str(imatrix) == AUTO:
            given = _auto_imatrix(src, auto_file, qtype, threads=threads, verbose=verbose, show=progress is not None)
        set_verbose(verbose)  # llama.cpp logs every tensor otherwise
        init_backend()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads or 0  # 0: llama.cpp uses every core
        params.allow_requantize = allow_requantize
        keep_alive: list = []
        if output_type is not None:
            params.output_tensor_type = output_type
        if embedding_type is not None:
            params.token_embedding_type = embedding_type
        if given is not None:
            keep_alive += _imatrix_array(given.entries)
            params.imatrix = keep_alive[0]
            kv = _kv_overrides(given, str(imatrix))
            keep_alive.append(kv)
            params.kv_overrides = kv
        if overrides:
            table = _tensor_type_array(overrides)
            keep_alive.append(table)
            params.tt_overrides = table[0]
        with log_to(_progress_reader(progress, verbose, failures)):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0:
            raise EdgeLLMError(_failure_line(src, qtype, status, failures[-1] if failures else None))
        with os_errors(dst, "write"):
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
        auto_file.unlink(missing_ok=True)
    return dst


def _auto_imatrix(src: Path, out: Path, qtype: str, *, threads: int | None, verbose: bool, show: bool) -> Imatrix:
    """--imatrix auto: edge-llm imatrix over the shipped calibration text, written beside the output
    (removed after) and read back as a given file would be."""
    from edge_llm.imatrix import make_imatrix

    print(f"quantize: computing an importance matrix of {src.name} for {qtype} (edge-llm imatrix; "
          "--imatrix FILE gives one)", file=sys.stderr, flush=True)
    make_imatrix(src, out, threads=threads, verbose=verbose, progress=show)
    return load_imatrix(out)


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


@dataclass
class Imatrix:
    """An importance matrix as llama-quantize reads it: each weight's mean squared activations, and
    what its file says about itself (recorded in the quantized file's metadata)."""

    entries: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int


def load_imatrix(path: Path) -> Imatrix:
    """llama-quantize's load_imatrix: the GGUF format (`NAME.in_sum2` / `NAME.counts`, per-expert
    counts, a weight never seen gets 1) or the legacy binary .dat."""
    if not path.is_file():
        raise EdgeLLMError(f"imatrix file not found: {path}")
    try:
        with os_errors(path, "read"):
            with open(path, "rb") as f:
                magic = f.read(4)
            return _load_gguf_imatrix(path) if magic == b"GGUF" else _load_legacy_imatrix(path)
    except (ValueError, struct.error, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise EdgeLLMError(f"{path}: not a valid imatrix file ({exc})") from None


def _load_gguf_imatrix(path: Path) -> Imatrix:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = {name: reader.get_field(name) for name in ("imatrix.datasets", "imatrix.chunk_count",
                                                       "imatrix.chunk_size")}
    if any(f is None for f in fields.values()):
        raise ValueError("no imatrix.datasets / chunk_count / chunk_size (llama-quantize refuses it too)")
    datasets = fields["imatrix.datasets"]
    datasets = list(datasets.contents()) if datasets.types[:2] == [GGUFValueType.ARRAY, GGUFValueType.STRING] else []
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = np.floor(tensors[base + ".counts"].reshape(-1).astype(np.float64) + 0.5)  # std::lround
        sums = sums.reshape(len(counts), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            means = sums / counts.astype(np.float32)[:, None]
        out[base] = np.where(counts[:, None] > 0, means, np.float32(1)).astype(np.float32).reshape(-1)
    if not out:
        raise ValueError("no *.in_sum2 tensors")
    return Imatrix(out, datasets, int(fields["imatrix.chunk_count"].contents()))


def _load_legacy_imatrix(path: Path) -> Imatrix:
    data = path.read_bytes()
    (n_entries,), pos, out = struct.unpack_from("<i", data, 0), 4, {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4: pos + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        pos += 12 + length
        values = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).copy()
        pos += 4 * nval
        out[name] = values / np.float32(ncall) if ncall > 0 else values
    if not out:
        raise ValueError("no entries")
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):  # optional tail: chunk count, dataset name
        (chunk_count,) = struct.unpack_from("<i", data, pos)
        if pos + 8 <= len(data):
            (length,) = struct.unpack_from("<i", data, pos + 4)
            if length > 0:
                datasets = [data[pos + 8: pos + 8 + length].decode(errors="replace")]
    return Imatrix(out, datasets, chunk_count)


def _kv_overrides(imatrix: Imatrix, file_name: str) -> ctypes.Array:
    """The metadata llama-quantize adds for an importance matrix, in its order (file as given,
    first dataset, entries, chunks when known), NUL-key terminated."""
    import llama_cpp

    values: list[tuple[str, str | int]] = [(_IMATRIX_KEYS[0], file_name)]
    if imatrix.datasets:
        values.append((_IMATRIX_KEYS[1], imatrix.datasets[0]))
    values.append((_IMATRIX_KEYS[2], len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        values.append((_IMATRIX_KEYS[3], imatrix.chunk_count))
    table = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(table, values, strict=False):
        item.key = key.encode()
        if isinstance(value, str):
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            item.value.val_str = value.encode()[:127]  # strncpy(..., 127), as llama-quantize
        else:
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            item.value.val_i64 = value
    return table


def ggml_type_id(name: str, flag: str) -> int:
    """A ggml type by name, any case (q4_k, Q8_0, f16, iq4_xs ...), as llama-quantize's parse_ggml_type."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        names = ", ".join(t.name.lower() for t in GGMLQuantizationType)
        raise InvalidParameterError(f"--{flag}: unknown ggml type {name!r}; choose from {names}",
                                    param=flag.replace("-", "_")) from None


def parse_tensor_type(text: str) -> tuple[str, int]:
    """--tensor-type "REGEX=TYPE" -> (the regex in lower case, as llama-quantize keeps it; the type)."""
    pattern, sep, name = text.partition("=")
    if not sep or not pattern or not name:
        raise InvalidParameterError(f"--tensor-type {text!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0 or "
                                    "'blk\\.[0-3]\\.ffn_down=q6_k'", param="tensor_type")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidParameterError(f"--tensor-type {text!r}: bad regular expression ({exc})",
                                    param="tensor_type") from None
    return pattern, ggml_type_id(name, "tensor-type")


def _tensor_type_array(overrides: list[tuple[str, int]]) -> list:
    """A C array of llama_model_tensor_override ending in a NULL pattern, and the bytes it points to."""
    import llama_cpp

    patterns = [p.encode() for p, _ in overrides]
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # zeroed: the last is NULL
    for item, pattern, (_, kind) in zip(table, patterns, overrides, strict=False):
        item.pattern = pattern
        item.type = kind
    return [table, patterns]


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
        epilog="types: " + ", ".join(sorted(types)) + f". Types that need an importance matrix (computed "
               f"when none is given): {', '.join(sorted(NEEDS_IMATRIX))}.")
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
    parser.add_argument("--imatrix", default=None, metavar="FILE|auto",
                        help="importance matrix from `edge-llm imatrix` or llama-imatrix (GGUF or .dat), or auto: "
                             "computed from the input with the shipped calibration text")
    parser.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                        help="quantize tensors whose name matches the regex PATTERN to TYPE, e.g. attn_v=q8_0 "
                             "(repeatable; llama-quantize's)")
    parser.add_argument("--output-tensor-type", default=None, metavar="TYPE", help="type of output.weight")
    parser.add_argument("--token-embedding-type", default=None, metavar="TYPE", help="type of token_embd.weight")
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
                        verbose=args.verbose, imatrix=args.imatrix, tensor_types=args.tensor_type,
                        output_tensor_type=args.output_tensor_type, token_embedding_type=args.token_embedding_type,
                        progress=progress_printer("quantizing") if show else None)
    print(dst)
    return 0
