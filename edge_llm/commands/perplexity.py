"""`edge-llm perplexity`: perplexity over a text file, computed the way llama.cpp's
`llama-perplexity` does it (tools/perplexity/perplexity.cpp, the default, stride-less mode):

- the whole text is tokenized once (BOS in front when the model adds one, special tokens not parsed);
- it is cut into n_chunk = n_tokens // n_ctx chunks of n_ctx tokens (the tail is dropped, at least
  2 * n_ctx tokens are needed); with a model that adds BOS, each chunk's first token is replaced by BOS;
- each chunk is evaluated from an empty cache, and only the second half is scored: the logits at
  positions first = n_ctx // 2 .. n_ctx - 2 predict the tokens at first + 1 .. n_ctx - 1, so every
  scored token has at least n_ctx / 2 tokens of context;
- ppl = exp(mean NLL over all scored tokens), printed as a running value after each chunk
  (`[1]12.3456,[2]...`), with llama.cpp's error estimate at the end.

With `--kl-divergence-base FILE` it also saves the model's log-probabilities at every scored position
in llama-perplexity's base-file format; `--kl-divergence-base FILE --kl-divergence` then evaluates
another model (a quant of it) on the file's own tokens and reports what llama-perplexity reports:
mean KL divergence, its percentiles (99th ...), Δp and the same-top-token share
(edge_llm/commands/kl_divergence.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_llm import files
from edge_llm.commands.kl_divergence import BaseFile, BaseWriter, ChunkTable, KLDAccumulator, KLDResult
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.options import CommandParser, add_model_flags, load_options

if TYPE_CHECKING:
    from edge_llm.engines.llamacpp import LlamaCppEngine

DEFAULT_CORPUS = Path(__file__).parents[1] / "data" / "genesis-kjv.txt"
DEFAULT_N_CTX = 512


@dataclass(frozen=True)
class ChunkPlan:
    """Which tokens llama-perplexity evaluates and scores."""

    n_ctx: int
    n_chunks: int

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - self.first - 1

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.scored_per_chunk


def plan_chunks(n_tokens: int, n_ctx: int, max_chunks: int | None = None) -> ChunkPlan:
    if n_ctx < 8:
        raise InvalidParameterError(f"context {n_ctx} is too small for perplexity", param="n_ctx")
    if n_tokens < 2 * n_ctx:
        raise EdgeLLMError(f"the text has {n_tokens} tokens; perplexity with a context of {n_ctx} needs at "
                           f"least {2 * n_ctx} (use a longer text or a smaller -c)")
    n_chunks = n_tokens // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    return ChunkPlan(n_ctx, n_chunks)


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float  # llama.cpp's +/- (standard error of the mean NLL, scaled by ppl)
    mean_nll: float
    n_ctx: int
    n_chunks: int
    n_scored: int
    n_tokens: int  # tokens in the whole text
    seconds: float
    tokens_per_s: float  # evaluated tokens per second (prompt processing with logits)
    running: list[float] = field(default_factory=list)  # ppl after each chunk
    kld: KLDResult | None = None  # against a --kl-divergence-base file


class PerplexityContext:
    """A llama.cpp context of its own on the engine's weights: one sequence, logits on the
    scored half of each chunk (the engine's scheduler context only keeps the last token's)."""

    def __init__(self, engine: LlamaCppEngine, n_ctx: int, *, n_threads: int | None = None,
                 cache_type_k: str | None = None, cache_type_v: str | None = None,
                 flash_attn: str | None = None) -> None:
        from edge_llm.engines import llama_runtime as rt

        options = engine.options
        threads = n_threads or engine.n_threads
        # n_batch = n_ctx: one llama_decode per chunk, as llama-perplexity with n_batch >= n_ctx.
        params = rt.context_params(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_seq_max=1,
                                   n_threads=threads, n_threads_batch=options.n_threads_batch or threads,
                                   flash_attn=flash_attn or engine.flash_attn,
                                   cache_type_k=cache_type_k or options.cache_type_k,
                                   cache_type_v=cache_type_v or options.cache_type_v)
        self.engine = engine
        self.n_ctx = n_ctx
        self.n_vocab = engine.n_vocab
        self.ctx = engine.new_context(params, what="a perplexity context")
        if rt.n_ctx_of(self.ctx) < n_ctx:
            raise EdgeLLMError(f"llama.cpp gave a context of {rt.n_ctx_of(self.ctx)} < {n_ctx}")
        self.batch = rt.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1)

    def logits(self, tokens: list[int], first: int, last: int) -> np.ndarray:
        """Evaluate `tokens` (positions 0..) from an empty cache; the logits at positions
        first..last inclusive, one row per position."""
        from edge_llm.engines import llama_runtime as rt
        from edge_llm.engines.llama_runtime import llama_cpp

        rt.clear_memory(self.ctx)
        self.batch.reset()
        rt.add_tokens(self.batch, tokens, pos=0, seq_id=0, logits=lambda i: first <= i <= last)
        status = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if status != 0:
            raise EdgeLLMError(f"llama_decode failed with status {status}")
        rows = last - first + 1
        ptr = llama_cpp.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).copy()

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the sums over 49k terms need the precision)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def tokenize_corpus(engine: LlamaCppEngine, text: str) -> list[int]:
    # llama-perplexity: common_tokenize(ctx, text, add_special=true, parse_special=false).
    return engine.tokenize(text, special=False, add_bos=engine.add_bos)


def compute_perplexity(engine: LlamaCppEngine, text: str | None, *, n_ctx: int = DEFAULT_N_CTX,
                       max_chunks: int | None = None, kld_base: BaseFile | None = None,
                       save_base: str | Path | None = None, cache_type_k: str | None = None,
                       cache_type_v: str | None = None, flash_attn: str | None = None, n_threads: int | None = None,
                       on_chunk: Callable[[int, int, float, float], None] | None = None,
                       on_kld_chunk: Callable[[int, KLDAccumulator], None] | None = None) -> PerplexityResult:
    """Perplexity of `text` in llama-perplexity's manner. `on_chunk(i, n_chunks, running_ppl,
    seconds_so_far)` is called after each chunk.

    `save_base`: also write the log-probabilities of every scored position there (a base file).
    `kld_base`: evaluate the base file's own tokens (`text` unused) and add the KL-divergence
    statistics against it (`on_kld_chunk(i, accumulator)` after each chunk)."""
    if kld_base is not None:
        if kld_base.n_vocab != engine.n_vocab:
            raise EdgeLLMError(f"{kld_base.path} was made with a vocabulary of {kld_base.n_vocab} tokens; this model "
                               f"has {engine.n_vocab}")
        tokens = kld_base.tokens
        n_ctx = kld_base.n_ctx
        n_chunks = min(kld_base.n_chunks, max_chunks) if max_chunks else kld_base.n_chunks
        plan = ChunkPlan(n_ctx, n_chunks)
    else:
        if text is None:
            raise InvalidParameterError("no text to evaluate", param="file")
        tokens = tokenize_corpus(engine, text)
        plan = plan_chunks(len(tokens), n_ctx, max_chunks)
    first, last = plan.first, n_ctx - 2
    writer = BaseWriter(save_base, n_ctx, engine.n_vocab, tokens, plan.n_chunks) if save_base else None
    kld = KLDAccumulator() if kld_base is not None else None
    ctx = PerplexityContext(engine, n_ctx, n_threads=n_threads, cache_type_k=cache_type_k,
                            cache_type_v=cache_type_v, flash_attn=flash_attn)
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    start = time.perf_counter()
    try:
        for i in range(plan.n_chunks):
            chunk = list(tokens[i * n_ctx: (i + 1) * n_ctx])
            if engine.add_bos:
                chunk[0] = engine.bos_id
            raw = ctx.logits(chunk, first, last)
            logprobs = log_softmax(raw)
            targets = np.asarray(chunk[first + 1:], dtype=np.int64)
            token_nll = -logprobs[np.arange(len(targets)), targets]
            nll += float(token_nll.sum())
            nll2 += float((token_nll ** 2).sum())
            count += len(targets)
            if writer is not None:
                writer.add(raw)
            if kld is not None:
                kld.add(raw, kld_base.chunk_records(i), targets)
                if on_kld_chunk is not None:
                    on_kld_chunk(i, kld)
            running.append(math.exp(nll / count))
            if on_chunk is not None:
                on_chunk(i, plan.n_chunks, running[-1], time.perf_counter() - start)
        if writer is not None:
            writer.commit()
            writer = None
    finally:
        ctx.close()
        if writer is not None:
            writer.discard()
    seconds = time.perf_counter() - start
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    return PerplexityResult(
        ppl=ppl, ppl_error=math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0,
        mean_nll=mean, n_ctx=n_ctx, n_chunks=plan.n_chunks, n_scored=count, n_tokens=len(tokens),
        seconds=seconds, tokens_per_s=plan.n_chunks * n_ctx / seconds if seconds > 0 else 0.0, running=running,
        kld=kld.result() if kld is not None else None)


def read_text(path: str | Path | None) -> str:
    return files.read_text(path or DEFAULT_CORPUS, "text file")


class ChunkPrinter:
    """llama-perplexity's progress: the time of the first pass with an ETA, then `[i]ppl,` per chunk."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream

    def __call__(self, i: int, n_chunks: int, ppl: float, seconds: float) -> None:
        if i == 0:
            eta = seconds * n_chunks
            print(f"perplexity: {seconds:.2f} seconds per pass - ETA {eta / 60:.2f} minutes", file=self.stream)
        print(f"[{i + 1}]{ppl:.4f},", end="\n" if i + 1 == n_chunks else "", file=self.stream, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", default=None,
                        help=f"text file (default: the shipped corpus, {DEFAULT_CORPUS.name})")
    parser.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    parser.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                        help="save this model's log-probabilities to FILE (llama-perplexity's format); with "
                             "--kl-divergence, read them and compare this model against them")
    parser.add_argument("--kl-divergence", action="store_true",
                        help="KL divergence, Δp and same-top-token share against --kl-divergence-base "
                             "(on the tokens stored there; -f is not read)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_flags(parser, defaults={"n_parallel": 1})
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_llm.engines.base import load_engine

    args = build_parser().parse_args(argv)
    if args.kl_divergence and not args.kl_divergence_base:
        raise InvalidParameterError("--kl-divergence needs --kl-divergence-base FILE (made by a run without "
                                    "--kl-divergence, on the base model)", param="kl_divergence_base")
    base = BaseFile.open(args.kl_divergence_base) if args.kl_divergence else None
    if base is not None and args.n_ctx and args.n_ctx != base.n_ctx:
        raise InvalidParameterError(f"{base.path} was computed with -c {base.n_ctx}, not {args.n_ctx}", param="n_ctx")
    n_ctx = base.n_ctx if base is not None else (args.n_ctx or DEFAULT_N_CTX)
    text = None if base is not None else read_text(args.file)
    save = args.kl_divergence_base if args.kl_divergence_base and not args.kl_divergence else None
    if save:
        files.check_output_path(save)
    # The engine's own (scheduler) context is not used for scoring: keep it minimal.
    engine = load_engine(args.model, engine=args.engine, options=load_options(args, n_ctx=64, n_parallel=1),
                         config=args.config)
    try:
        result = compute_perplexity(engine, text, n_ctx=n_ctx, max_chunks=args.chunks, kld_base=base, save_base=save,
                                    on_chunk=ChunkPrinter() if base is None else None,
                                    on_kld_chunk=ChunkTable())
    finally:
        engine.close()
    if args.json:
        print(json.dumps(asdict(result)))
    elif result.kld is not None:
        print(result.kld.report())
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}  ({result.n_chunks} chunks of "
              f"{result.n_ctx}, {result.n_scored} tokens scored, {result.tokens_per_s:.0f} tokens/s)")
    return 0
