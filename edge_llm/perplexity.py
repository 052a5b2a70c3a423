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

It can also save the top-k next-token log-probabilities of every scored position (`--save-reference`)
and compare another model (a quantized variant of it) against them (`--reference`): top-1
agreement and mean KL divergence. Keeping only the reference's top-k (default 64) keeps the file
small (the full distribution is 49k floats a position for SmolLM2); the KL is then computed over
those k tokens plus the rest of the probability mass as one bucket, which is a lower bound of the
full KL (merging outcomes never increases it) and very close when the reference's mass is in its
top k, as it is for next-token distributions.
"""

from __future__ import annotations

import argparse
import hashlib
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
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.options import CommandParser, add_model_flags, load_options

if TYPE_CHECKING:
    from edge_llm.engines.llamacpp import LlamaCppEngine

DEFAULT_CORPUS = Path(__file__).with_name("data") / "genesis-kjv.txt"
DEFAULT_N_CTX = 512
DEFAULT_TOP_K = 64


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
class TopKReference:
    """Top-k next-token log-probs at every scored position of a reference run."""

    n_ctx: int
    n_chunks: int
    tokens_sha256: str  # of the evaluated tokens: a reference only fits the same text and chunking
    ids: np.ndarray  # (positions, k) int32, best first
    logprobs: np.ndarray  # (positions, k) float32

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial.npz")
        try:
            with files.os_errors(path, "write"):
                np.savez_compressed(tmp, n_ctx=self.n_ctx, n_chunks=self.n_chunks,
                                    tokens_sha256=self.tokens_sha256, ids=self.ids, logprobs=self.logprobs)
                tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> TopKReference:
        try:
            with np.load(path) as data:
                return cls(int(data["n_ctx"]), int(data["n_chunks"]), str(data["tokens_sha256"]),
                           data["ids"], data["logprobs"])
        except (OSError, KeyError, ValueError) as exc:
            raise EdgeLLMError(f"cannot read perplexity reference {path}: {exc}") from None


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
    top1_agreement: float | None = None  # vs the reference
    mean_kl: float | None = None


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


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best token ids of each row, best first, and their log-probs."""
    k = min(k, logprobs.shape[1])
    ids = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logprobs, ids, axis=1), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    return ids.astype(np.int32), np.take_along_axis(logprobs, ids, axis=1).astype(np.float32)


def kl_top_k(ref_ids: np.ndarray, ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || model) per row over the reference's top-k tokens plus one bucket for the rest."""
    p_log = ref_logprobs.astype(np.float64)
    q_log = np.take_along_axis(logprobs, ref_ids.astype(np.int64), axis=1)
    p = np.exp(p_log)
    kl = (p * (p_log - q_log)).sum(axis=1)
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(q_log).sum(axis=1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return kl + rest


def tokenize_corpus(engine: LlamaCppEngine, text: str) -> list[int]:
    # llama-perplexity: common_tokenize(ctx, text, add_special=true, parse_special=false).
    return engine.tokenize(text, special=False, add_bos=engine.add_bos)


def compute_perplexity(engine: LlamaCppEngine, text: str, *, n_ctx: int = DEFAULT_N_CTX,
                       max_chunks: int | None = None, reference: TopKReference | None = None,
                       save_top_k: int = 0, cache_type_k: str | None = None, cache_type_v: str | None = None,
                       flash_attn: str | None = None, n_threads: int | None = None,
                       on_chunk: Callable[[int, int, float, float], None] | None = None,
                       ) -> tuple[PerplexityResult, TopKReference | None]:
    """Perplexity of `text` in llama-perplexity's manner. `on_chunk(i, n_chunks, running_ppl,
    seconds_so_far)` is called after each chunk. Returns the result and, with save_top_k > 0, the
    top-k reference of this run."""
    tokens = tokenize_corpus(engine, text)
    plan = plan_chunks(len(tokens), n_ctx, max_chunks)
    evaluated = tokens[: plan.n_chunks * n_ctx]
    sha = hashlib.sha256(np.asarray(evaluated, dtype=np.int32).tobytes()).hexdigest()
    if reference is not None and (reference.n_ctx, reference.n_chunks, reference.tokens_sha256) != (
            n_ctx, plan.n_chunks, sha):
        raise EdgeLLMError("the reference was computed on another text, context size or number of chunks")
    first, last = plan.first, n_ctx - 2
    ctx = PerplexityContext(engine, n_ctx, n_threads=n_threads, cache_type_k=cache_type_k,
                            cache_type_v=cache_type_v, flash_attn=flash_attn)
    nll = nll2 = 0.0
    count = 0
    same_top = 0
    kl_sum = 0.0
    running: list[float] = []
    saved_ids, saved_lp = [], []
    start = time.perf_counter()
    try:
        for i in range(plan.n_chunks):
            chunk = list(tokens[i * n_ctx: (i + 1) * n_ctx])
            if engine.add_bos:
                chunk[0] = engine.bos_id
            logprobs = log_softmax(ctx.logits(chunk, first, last))
            targets = np.asarray(chunk[first + 1:], dtype=np.int64)
            token_nll = -logprobs[np.arange(len(targets)), targets]
            nll += float(token_nll.sum())
            nll2 += float((token_nll ** 2).sum())
            count += len(targets)
            if save_top_k:
                ids, lp = top_k(logprobs, save_top_k)
                saved_ids.append(ids)
                saved_lp.append(lp)
            if reference is not None:
                rows = slice(i * plan.scored_per_chunk, (i + 1) * plan.scored_per_chunk)
                ref_ids, ref_lp = reference.ids[rows], reference.logprobs[rows]
                same_top += int((logprobs.argmax(axis=1) == ref_ids[:, 0]).sum())
                kl_sum += float(kl_top_k(ref_ids, ref_lp, logprobs).sum())
            running.append(math.exp(nll / count))
            if on_chunk is not None:
                on_chunk(i, plan.n_chunks, running[-1], time.perf_counter() - start)
    finally:
        ctx.close()
    seconds = time.perf_counter() - start
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    result = PerplexityResult(
        ppl=ppl, ppl_error=math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0,
        mean_nll=mean, n_ctx=n_ctx, n_chunks=plan.n_chunks, n_scored=count, n_tokens=len(tokens),
        seconds=seconds, tokens_per_s=plan.n_chunks * n_ctx / seconds if seconds > 0 else 0.0, running=running,
        top1_agreement=same_top / count if reference is not None else None,
        mean_kl=kl_sum / count if reference is not None else None)
    saved = None
    if save_top_k:
        saved = TopKReference(n_ctx, plan.n_chunks, sha, np.concatenate(saved_ids), np.concatenate(saved_lp))
    return result, saved


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
    parser.add_argument("--save-reference", default=None, metavar="FILE.npz",
                        help="save this model's top-k next-token log-probs for later --reference runs")
    parser.add_argument("--reference", default=None, metavar="FILE.npz",
                        help="report top-1 agreement and mean KL against a saved reference")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="log-probs kept per position in a reference")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_flags(parser, defaults={"n_parallel": 1})
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_llm.engines.base import load_engine

    args = build_parser().parse_args(argv)
    n_ctx = args.n_ctx or DEFAULT_N_CTX
    text = read_text(args.file)
    if args.save_reference:
        files.check_output_path(args.save_reference)
    reference = TopKReference.load(args.reference) if args.reference else None
    # The engine's own (scheduler) context is not used for scoring: keep it minimal.
    engine = load_engine(args.model, engine=args.engine, options=load_options(args, n_ctx=64, n_parallel=1),
                         config=args.config)
    try:
        result, saved = compute_perplexity(engine, text, n_ctx=n_ctx, max_chunks=args.chunks, reference=reference,
                                           save_top_k=args.top_k if args.save_reference else 0,
                                           on_chunk=ChunkPrinter())
    finally:
        engine.close()
    if saved is not None:
        saved.save(args.save_reference)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}  ({result.n_chunks} chunks of "
              f"{result.n_ctx}, {result.n_scored} tokens scored, {result.tokens_per_s:.0f} tokens/s)")
        if result.top1_agreement is not None:
            print(f"vs reference: top-1 agreement {result.top1_agreement * 100:.2f}%, "
                  f"mean KL {result.mean_kl:.6f}")
    return 0
