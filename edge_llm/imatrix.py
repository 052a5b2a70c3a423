"""`edge-llm imatrix`: an importance matrix for quantization, computed as llama.cpp's `llama-imatrix`
computes it (tools/imatrix/imatrix.cpp) and written in its GGUF format, so `llama-quantize
--imatrix` reads it and `edge-llm quantize` makes the same file from it.

    edge-llm imatrix model-f16.gguf -o imatrix.gguf            # the shipped calibration text
    edge-llm imatrix model-f16.gguf -f my-text.txt --chunks 64 -c 512

What is collected (llama-imatrix's rules): llama.cpp's evaluation callback (`cb_eval`) sees every
matrix multiplication of the graph; for each MUL_MAT whose weight is a `blk.*` tensor (and
`output.weight` with --process-output) and whose input has at least 16 rows of F32, the squares of
every input row are added to that weight's sums, one count per row; for MUL_MAT_ID (mixture of
experts) each routed row goes to its expert's sums and count. The text is tokenized once (BOS in
front when the model adds one), cut into chunks of -c tokens (the first of each replaced by BOS),
every chunk evaluated from an empty cache with the logits of every token asked for (so the last
layer sees every row, as in llama-imatrix), and -b / -c chunks share one decode. The sums are float32
and added row after row in llama-imatrix's order, so the file matches its file to the bit on the
same llama.cpp build. The perplexity of each chunk's second half is printed as it goes, as
llama-imatrix prints it.

Memory stays bounded: the sums (one float per input column of every weight and expert), one
decode's logits (-b x vocabulary floats) and one copy of the sums taken before each decode, which
Ctrl-C goes back to: the file then holds every chunk finished before it, and is written as usual.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_llm import files
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.options import CommandParser

if TYPE_CHECKING:
    from edge_llm.engines.llamacpp import LlamaCppEngine

DEFAULT_TEXT = Path(__file__).with_name("data") / "calibration.txt"
DEFAULT_TEXT_NAME = "edge_llm/data/calibration.txt"  # what the file records as its dataset
DEFAULT_N_CTX = 512
DEFAULT_N_BATCH = 512  # tokens per decode: its logits (-b x vocabulary floats) are the largest buffer
# --imatrix auto reads this many chunks of the shipped text (32k tokens at -c 512, every kind of text
# in it; 111 chunks would be all): bounded time before a quantization of a large model.
AUTO_CHUNKS = 64
MIN_ROWS = 16  # llama-imatrix ignores matrix products of fewer rows ("why are small batches ignored?")


# -- the sums ----------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One weight's sums of squared inputs: values (n_mat, ne0) float32, counts (n_mat,) rows added."""

    values: np.ndarray
    counts: np.ndarray


def add_squares(acc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """acc + rows[0]**2 + rows[1]**2 + ... in float32, added one row after another as llama-imatrix's
    loop does (numpy reduces a non-contiguous axis in order, without pairwise summation)."""
    buf = np.empty((len(rows) + 1, acc.shape[-1]), dtype=np.float32)
    buf[0] = acc
    np.multiply(rows, rows, out=buf[1:])
    return np.add.reduce(buf, axis=0)


class Collector:
    """The importance matrix as it accumulates: weight name -> Entry."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _entry(self, name: str, ne0: int, n_mat: int, n_counts: int) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = Entry(np.zeros((n_mat, ne0), dtype=np.float32),
                                               np.zeros(n_counts, dtype=np.int64))
        elif entry.values.shape != (n_mat, ne0):
            raise EdgeLLMError(f"imatrix: inconsistent size for {name} ({entry.values.size} vs {n_mat * ne0})")
        return entry

    def add_dense(self, name: str, x: np.ndarray, weight_ne2: int, weight_ne3: int) -> None:
        """A MUL_MAT's input x (ne3, ne2, ne1, ne0); the weight is 2D (one matrix) or has
        weight_ne2 x weight_ne3 matrices, each fed by its slice of x."""
        ne3, ne2, ne1, ne0 = x.shape
        n_mat = weight_ne2 * weight_ne3
        entry = self._entry(name, ne0, n_mat, 1)
        if n_mat == 1:
            entry.values[0] = add_squares(entry.values[0], x.reshape(-1, ne0))
        else:
            for i3 in range(ne3):
                for i2 in range(ne2):
                    mat = (i3 % weight_ne3) * weight_ne2 + (i2 % weight_ne2)
                    entry.values[mat] = add_squares(entry.values[mat], x[i3, i2])
        if not np.isfinite(entry.values).all():
            raise EdgeLLMError(f"imatrix: non-finite activations in {name}")
        entry.counts += (ne1 * ne2 * ne3) // n_mat

    def add_experts(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """A MUL_MAT_ID's input x (n_tokens, ne1, ne0) and routing ids (n_tokens, n_used): row
        x[t, k % ne1] goes to expert ids[t, k], in llama-imatrix's order (k outer, t inner)."""
        n_tokens, ne1, ne0 = x.shape
        entry = self._entry(name, ne0, n_expert, n_expert)
        if ids.shape[0] != n_tokens:
            raise EdgeLLMError(f"imatrix: {name}: {ids.shape[0]} routing rows for {n_tokens} tokens")
        experts = np.ascontiguousarray(ids.T).reshape(-1)  # k-major: the order rows are added in
        if experts.size and (experts.min() < 0 or experts.max() >= n_expert):
            raise EdgeLLMError(f"imatrix: {name}: an expert id outside 0..{n_expert - 1}")
        order = np.argsort(experts, kind="stable")
        sorted_experts = experts[order]
        starts = np.flatnonzero(np.r_[True, sorted_experts[1:] != sorted_experts[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            expert = int(sorted_experts[start])
            seq = order[start:end]
            rows = x[seq % n_tokens, (seq // n_tokens) % ne1]
            entry.values[expert] = add_squares(entry.values[expert], rows)
            entry.counts[expert] += len(seq)
            if not np.isfinite(entry.values[expert]).all():
                raise EdgeLLMError(f"imatrix: non-finite activations in {name}")

    def snapshot(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (e.values.copy(), e.counts.copy()) for name, e in self.entries.items()}

    def restore(self, saved: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.entries = {name: Entry(v, c) for name, (v, c) in saved.items()}


def weight_name(raw: str) -> str:
    """llama-imatrix's filter_tensor_name: 'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight'."""
    if "#" in raw:
        return raw.split("#", 2)[1]
    return raw


class EvalCollector:
    """The evaluation callback: decides which nodes to read (ask=True) and adds them (ask=False).
    Exceptions are kept for the caller (ctypes would print and drop them); once `stop` is set it
    reads nothing more and cuts the rest of the graph short."""

    def __init__(self, collector: Collector, *, process_output: bool = False) -> None:
        from edge_llm.engines import ggml_tensors as gt

        gt.check_layout()
        ops = gt.op_ids("MUL_MAT", "MUL_MAT_ID")
        self.gt = gt
        self.mul_mat, self.mul_mat_id = ops["MUL_MAT"], ops["MUL_MAT_ID"]
        self.collector = collector
        self.process_output = process_output
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._layout_checked = False
        self.callback = gt.eval_callback(self)

    def __call__(self, address: int, ask: bool) -> bool:
        try:
            if self.stop.is_set():
                return False
            return self._wants(address) if ask else self._collect(address)
        except BaseException as exc:  # noqa: BLE001 -- handed to the decoding thread, see above
            self.error = exc
            self.stop.set()
            return False

    def _wants(self, address: int) -> bool:
        gt = self.gt
        op = gt.op_of(address)
        if op == self.mul_mat_id:
            return True
        if op != self.mul_mat:
            return False
        t = gt.tensor_at(address)
        if not self._layout_checked:
            gt.check_name_offset(address)
            self._layout_checked = True
        src1 = gt.tensor_at(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != gt.F32:
            return False
        name = weight_name(gt.tensor_name(gt.tensor_at(t.src[0])))
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _collect(self, address: int) -> bool:
        gt = self.gt
        t = gt.tensor_at(address)
        src0, src1 = gt.tensor_at(t.src[0]), gt.tensor_at(t.src[1])
        if src1.type != gt.F32:
            return True
        name = weight_name(gt.tensor_name(src0))
        x = gt.host_array(src1, np.float32)
        if t.op == self.mul_mat_id:
            if x.shape[0] != 1:
                raise EdgeLLMError(f"imatrix: {name}: a 4D expert input is not supported")
            ids = gt.host_array(gt.tensor_at(t.src[2]), np.int32)[0, 0]
            self.collector.add_experts(name, x[0], ids, int(src0.ne[2]))
        else:
            self.collector.add_dense(name, x, int(src0.ne[2]), int(src0.ne[3]))
        return True


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class ImatrixRun:
    entries: dict[str, Entry]
    n_chunks: int  # chunks whose every token was collected
    chunk_size: int
    n_tokens: int  # in the whole text
    seconds: float
    interrupted: bool = False
    ppl: float | None = None
    running_ppl: list[float] = field(default_factory=list)


def plan(n_tokens: int, n_ctx: int, n_batch: int, max_chunks: int | None) -> tuple[int, int]:
    """(chunks, sequences per decode) as llama-imatrix plans them."""
    if n_ctx < 2 * MIN_ROWS:
        raise InvalidParameterError(f"context {n_ctx} is too small for an importance matrix (at least "
                                    f"{2 * MIN_ROWS})", param="n_ctx")
    if n_batch >= n_ctx and n_batch % n_ctx:
        raise InvalidParameterError(f"-b {n_batch} must be below -c {n_ctx} or a multiple of it", param="n_batch")
    if n_tokens < 2 * n_ctx:
        raise EdgeLLMError(f"the text has {n_tokens} tokens; a context of {n_ctx} needs at least {2 * n_ctx} "
                           "(use a longer text or a smaller -c)")
    n_chunks = n_tokens // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    return n_chunks, max(1, n_batch // n_ctx)


def _chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, in float64 a slice of rows at a time (a vocabulary row is 150k floats)."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), 64):
        rows = logits[i:i + 64].astype(np.float64)
        peak = rows.max(axis=1)
        out[i:i + 64] = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1)) - rows[np.arange(len(rows)),
                                                                                        targets[i:i + 64]]
    return out


@contextmanager
def stop_on_interrupt(stop: threading.Event, notice: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C sets `stop` instead of raising (on the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(_signum, _frame) -> None:
        if not stop.is_set():
            notice()
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def compute_imatrix(engine: LlamaCppEngine, text: str, *, n_ctx: int = DEFAULT_N_CTX, n_batch: int | None = None,
                    max_chunks: int | None = None, process_output: bool = False, compute_ppl: bool = True,
                    parse_special: bool = False,
                    on_chunk: Callable[[int, int, float | None, float], None] | None = None) -> ImatrixRun:
    """The importance matrix of `engine`'s model over `text`, in llama-imatrix's manner.
    `on_chunk(i, n_chunks, running_ppl, seconds)` after each chunk. Ctrl-C (on the main thread)
    ends the run after the last whole chunk."""
    from edge_llm.engines import llama_runtime as rt
    from edge_llm.engines.llama_runtime import llama_cpp

    tokens = engine.tokenize(text, special=parse_special, add_bos=engine.add_bos)
    n_batch = n_batch or min(n_ctx, DEFAULT_N_BATCH)
    n_chunks, n_seq = plan(len(tokens), n_ctx, n_batch, max_chunks)
    n_kv = n_seq * n_ctx
    n_batch = min(n_batch, n_kv)
    collector = Collector()
    evaluator = EvalCollector(collector, process_output=process_output)
    options = engine.options
    params = rt.context_params(n_ctx=n_kv, n_batch=n_batch, n_ubatch=min(n_batch, 512), n_seq_max=n_seq,
                               n_threads=engine.n_threads, n_threads_batch=options.n_threads_batch or engine.n_threads,
                               flash_attn=engine.flash_attn, cache_type_k=options.cache_type_k,
                               cache_type_v=options.cache_type_v)
    params.cb_eval = evaluator.callback
    params.cb_eval_user_data = None
    ctx = engine.new_context(params, what="an imatrix context")
    batch = rt.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=n_seq)
    first, n_vocab = n_ctx // 2, engine.n_vocab
    nll = nll2 = 0.0
    scored, done = 0, 0
    running: list[float] = []
    start = time.perf_counter()

    def notice() -> None:
        print("\nimatrix: stopping; the file keeps the chunks finished so far", file=sys.stderr, flush=True)

    try:
        with stop_on_interrupt(evaluator.stop, notice):
            for i in range(0, n_chunks, n_seq):
                if evaluator.stop.is_set():
                    break
                saved = collector.snapshot()
                rt.clear_memory(ctx)
                n_seq_batch = min(n_seq, n_chunks - i)
                chunk_nll: list[np.ndarray] = []
                for j in range(0, n_ctx, n_batch):
                    size = min(n_batch, n_ctx - j)
                    batch.reset()
                    for seq in range(n_seq_batch):
                        part = list(tokens[(i + seq) * n_ctx + j:(i + seq) * n_ctx + j + size])
                        if engine.add_bos and j == 0:
                            part[0] = engine.bos_id
                        rt.add_tokens(batch, part, pos=j, seq_id=seq, logits=lambda _k: True)
                    status = llama_cpp.llama_decode(ctx.ctx, batch.batch)
                    if evaluator.error is not None:
                        raise evaluator.error
                    if evaluator.stop.is_set():
                        break
                    if status != 0:
                        raise EdgeLLMError(f"llama_decode failed with status {status}")
                    if compute_ppl and j + size > first:
                        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx.ctx),
                                                       shape=(n_seq_batch * size, n_vocab))
                        lo, hi = max(first, j), min(n_ctx - 1, j + size)  # positions scored here
                        for seq in range(n_seq_batch):
                            base = (i + seq) * n_ctx
                            targets = np.asarray(tokens[base + lo + 1:base + hi + 1], dtype=np.int64)
                            chunk_nll.append(_chunk_nll(logits[seq * size + lo - j: seq * size + hi - j], targets))
                if evaluator.stop.is_set():
                    collector.restore(saved)
                    break
                for k in range(n_seq_batch):
                    done += 1
                    if compute_ppl:
                        values = np.concatenate(chunk_nll[k::n_seq_batch])
                        nll += float(values.sum())
                        nll2 += float((values ** 2).sum())
                        scored += len(values)
                        running.append(math.exp(nll / scored))
                    if on_chunk is not None:
                        on_chunk(done - 1, n_chunks, running[-1] if running else None, time.perf_counter() - start)
    finally:
        batch.close()
        ctx.close()
    return ImatrixRun(collector.entries, done, n_ctx, len(tokens), time.perf_counter() - start,
                      interrupted=done < n_chunks, ppl=running[-1] if running else None, running_ppl=running)


# -- the file ---------------------------------------------------------------------------------------


def write_imatrix(path: str | Path, entries: dict[str, Entry], *, datasets: list[str], chunk_count: int,
                  chunk_size: int) -> Path:
    """llama-imatrix's GGUF: general.type = imatrix, imatrix.datasets / chunk_count / chunk_size, and
    per weight NAME.in_sum2 (n_mat x ne0 sums) and NAME.counts (n_mat x 1), names sorted. Written to
    a temporary name and renamed."""
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with files.os_errors(path, "write"):
            writer = gguf.GGUFWriter(tmp, arch="")
            # GGUFWriter writes general.architecture first; an imatrix has none (llama-imatrix's keys only).
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", datasets)
            writer.add_uint32("imatrix.chunk_count", chunk_count)
            writer.add_uint32("imatrix.chunk_size", chunk_size)
            for name in sorted(entries):
                entry = entries[name]
                # ggml writes a tensor's dimensions without trailing ones: one matrix is 1D there.
                values, counts = entry.values.astype(np.float32), entry.counts.astype(np.float32).reshape(-1, 1)
                if len(values) == 1:
                    values, counts = values.reshape(-1), counts.reshape(-1)
                writer.add_tensor(f"{name}.in_sum2", values)
                writer.add_tensor(f"{name}.counts", counts)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- from a file, for quantize and convert -----------------------------------------------------------


class ChunkPrinter:
    """llama-imatrix's progress on stderr: the first pass's time with an ETA, then `[i]ppl,`."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream

    def __call__(self, i: int, n_chunks: int, ppl: float | None, seconds: float) -> None:
        if i == 0:
            print(f"imatrix: {seconds:.2f} seconds per pass - ETA {seconds * n_chunks / 60:.2f} minutes",
                  file=self.stream)
        mark = f"[{i + 1}]{ppl:.4f}," if ppl is not None else f"[{i + 1}/{n_chunks}]"
        print(mark, end="\n" if i + 1 == n_chunks else "", file=self.stream, flush=True)


def make_imatrix(model: str | Path, out: str | Path, *, text_file: str | Path | None = None,
                 n_ctx: int = DEFAULT_N_CTX, max_chunks: int | None = AUTO_CHUNKS, threads: int | None = None,
                 verbose: bool = False, progress: bool = True) -> ImatrixRun:
    """Compute an importance matrix of a GGUF file over a text (default: the shipped calibration
    text) and write it to `out`: what `--imatrix auto` runs before quantizing."""
    from edge_llm.engines.base import load_engine
    from edge_llm.load_options import LoadOptions

    text = files.read_text(text_file or DEFAULT_TEXT, "text file")
    options = LoadOptions(n_ctx=64, n_parallel=1, n_threads=threads, verbose=verbose)
    engine = load_engine(str(model), options=options)
    try:
        run = compute_imatrix(engine, text, n_ctx=n_ctx, max_chunks=max_chunks,
                              on_chunk=ChunkPrinter() if progress else None)
    finally:
        engine.close()
    if run.interrupted:
        raise KeyboardInterrupt
    write_imatrix(out, run.entries, datasets=[str(text_file) if text_file else DEFAULT_TEXT_NAME],
                  chunk_count=run.n_chunks, chunk_size=run.chunk_size)
    return run


# -- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from edge_llm.options import MODEL, add_load_flags

    parser = CommandParser(prog="edge-llm imatrix", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("model", help="the model: a .gguf (best its f16 / bf16 / f32 form) or a registry name")
    parser.add_argument("-f", "--file", default=None,
                        help=f"calibration text (default: the shipped {DEFAULT_TEXT.name}: prose, a technical "
                             "glossary, C code, data and Spanish, all public domain)")
    parser.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default: imatrix.gguf)")
    parser.add_argument("--chunks", type=int, default=None, help="process at most this many chunks of -c tokens")
    parser.add_argument("--process-output", action="store_true", help="collect output.weight too (as llama-imatrix)")
    parser.add_argument("--no-ppl", action="store_true", help="do not compute the perplexity as it goes")
    parser.add_argument("--parse-special", action="store_true", help="read special-token text in the file as tokens")
    parser.add_argument("--config", default=None, help="a models.toml that adds to the built-in registry")
    add_load_flags(parser, MODEL, only=("n_ctx", "n_threads", "n_threads_batch", "n_batch", "n_gpu_layers",
                                        "split_mode", "tensor_split", "main_gpu", "flash_attn", "cache_type_k", "repack",
                                        "cache_type_v", "use_mmap", "use_mlock", "verbose"),
                   defaults={"n_ctx": DEFAULT_N_CTX, "n_batch": DEFAULT_N_BATCH})
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_llm.engines.base import load_engine
    from edge_llm.options import load_options

    args = build_parser().parse_args(argv)
    if args.chunks is not None and args.chunks < 1:
        raise InvalidParameterError(f"invalid --chunks {args.chunks} (must be >= 1)", param="chunks")
    # The engine's own (scheduler) context is not used: keep it minimal; -c is the chunk size.
    options = load_options(args, n_ctx=64, n_parallel=1)
    n_ctx, n_batch = args.n_ctx or DEFAULT_N_CTX, options.n_batch or DEFAULT_N_BATCH
    text = files.read_text(args.file or DEFAULT_TEXT, "text file")
    out = files.check_output_path(Path(args.output).expanduser())
    engine = load_engine(args.model, options=options, config=args.config)
    try:
        print(f"imatrix: {engine.path.name}, chunks of {n_ctx} tokens", file=sys.stderr)
        run = compute_imatrix(engine, text, n_ctx=n_ctx, n_batch=n_batch, max_chunks=args.chunks,
                              process_output=args.process_output, compute_ppl=not args.no_ppl,
                              parse_special=args.parse_special, on_chunk=ChunkPrinter())
    finally:
        engine.close()
    if run.n_chunks == 0:
        raise EdgeLLMError("stopped before the first chunk was finished; nothing written")
    write_imatrix(out, run.entries, datasets=[args.file or DEFAULT_TEXT_NAME], chunk_count=run.n_chunks,
                  chunk_size=run.chunk_size)
    print(f"imatrix: {len(run.entries)} weights over {run.n_chunks} chunks of {run.chunk_size} tokens"
          + (f", PPL {run.ppl:.4f}" if run.ppl is not None else "") + f", {run.seconds:.1f} s"
          + (" (stopped early)" if run.interrupted else ""), file=sys.stderr)
    print(out)
    return 0
