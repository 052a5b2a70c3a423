"""Embeddings and rerank scores: pooled outputs of llama.cpp, on a context and a thread of their own.

Requests (a list of token sequences each) queue here; the thread packs the waiting sequences into
each llama_decode, several sequences per decode (each whole in one micro-batch: an encoder attends
over the whole sequence at once), taking them from the waiting requests in turn so that one client's
thousand inputs never hold back another's one. A sequence's result goes to its request as soon as
its decode is done; a request whose reader left (a client that disconnected, a Ctrl-C) is dropped
before the next decode, and nothing of it is computed after that.

Results are what llama-server returns: the pooled vector, normalized as asked (`normalize`, as
llama-server's `embd_normalize`), or, with rank pooling, the classifier's first output (a
cross-encoder's logit; P(yes) for Qwen3-Reranker).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge_llm.engines import llama_runtime as rt
from edge_llm.engines.cpu_threads import ThreadGovernor
from edge_llm.engines.llama_runtime import llama_cpp
from edge_llm.engines.threadbridge import Channel
from edge_llm.engines.work_thread import WorkThread
from edge_llm.errors import ContextLengthError, InvalidParameterError

log = logging.getLogger(__name__)

# Sequences in one decode at most (llama.cpp's limit is 256; more gains nothing on a CPU).
MAX_SEQUENCES = 64


def normalized(vector: np.ndarray, norm: int) -> np.ndarray:
    """llama.cpp's common_embd_normalize: -1 none, 0 max-abs scaled to int16's range, 1 taxicab,
    2 euclidean, >2 p-norm."""
    if norm < 0:
        return vector
    if norm == 0:
        total = float(np.abs(vector).max(initial=0.0)) / 32760.0
    elif norm == 2:
        total = float(np.sqrt(np.dot(vector.astype(np.float64), vector)))
    else:
        total = float(np.sum(np.abs(vector.astype(np.float64)) ** norm) ** (1.0 / norm))
    return vector * (1.0 / total if total > 0.0 else 0.0)


@dataclass
class PooledRequest:
    """One caller's sequences; results come through `channel` as (index, vector) in any order."""

    sequences: list[list[int]]
    normalize: int
    channel: Channel = field(default_factory=Channel)
    next: int = 0  # the next sequence to schedule
    pending: int = 0  # scheduled and not yet answered

    @property
    def finished(self) -> bool:
        return self.next >= len(self.sequences) and self.pending == 0


class PooledWorker:
    """A llama.cpp context with pooled outputs (`pooling`: llama_pooling_type) and its thread."""

    def __init__(self, model: rt.LlamaModel, *, pooling: int, n_ctx: int, n_batch: int, n_threads: int,
                 adapt_threads: bool, verbose: bool, what: str) -> None:
        self.n_ctx = n_ctx
        self.n_batch = max(1, min(n_batch, n_ctx))  # tokens a decode packs (more when one sequence is longer)
        self.pooling = pooling
        self.n_seq_max = MAX_SEQUENCES
        # Every sequence is decoded whole and forgotten after its decode, so a pool of n_ctx cells
        # shared by all sequences (kv_unified) holds any batch.
        # llama.cpp pads a context to 256 cells; a micro-batch of another size fails its graph's
        # shapes (GGML_ASSERT in ggml_mul_mat, an abort): both are rounded up, inputs stay at n_ctx.
        size = -(-n_ctx // 256) * 256
        params = rt.context_params(n_ctx=size, n_batch=size, n_ubatch=size, n_seq_max=self.n_seq_max,
                                   n_threads=n_threads, kv_unified=True, pooling=pooling)
        self.ctx = rt.new_context(model, params, verbose=verbose, what=what)
        self.n_out = (int(llama_cpp.llama_model_n_cls_out(model.model)) if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK
                      else int(llama_cpp.llama_model_n_embd_out(model.model))
                      if hasattr(llama_cpp, "llama_model_n_embd_out") else model.n_embd())
        self._batch = rt.LlamaBatch(n_tokens=size, embd=0, n_seq_max=1)
        # Fewer threads while other programs hold cores, as the generating scheduler does: two
        # spinning threads with one core taken ran a tiny encoder's decodes 400x slower than one.
        self._governor = ThreadGovernor(n_threads, adapt=adapt_threads)
        self._threads = n_threads
        self._waiting: deque[PooledRequest] = deque()
        self.decoded = 0  # sequences decoded so far (tests and /metrics read it)
        self._wake = threading.Condition()
        self._closed = False
        self._worker = WorkThread("edge-llm-pooled", self._run)  # runs while inputs wait

    # -- the callers' side

    def submit(self, sequences: list[list[int]], *, normalize: int = 2, channel: Channel | None = None) -> PooledRequest:
        """Queue the sequences (checked first: each must fit the context and hold a token); results
        come through `channel` (bound to the reader's loop before this, for an async reader)."""
        for i, tokens in enumerate(sequences):
            if not tokens:  # llama_decode aborts the process on an empty batch
                raise InvalidParameterError(f"input {i} has no tokens", param="input")
            if len(tokens) > self.n_ctx:
                raise ContextLengthError(f"input {i} has {len(tokens)} tokens, more than the {self.n_ctx} an input "
                                         "may have (raise it with -c)", param="input")
        request = PooledRequest([list(t) for t in sequences], normalize, channel or Channel())
        with self._wake:
            if self._closed:
                raise InvalidParameterError("the model is being unloaded", param="model")
            self._waiting.append(request)
            self._worker.start()
            self._wake.notify()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()
        self._batch.close()
        self.ctx.close()

    # -- the thread

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closed and not self._waiting:
                    self._worker.ended()  # nothing left: the thread ends (engines/work_thread.py says why)
                    return
                if self._closed:
                    for request in self._waiting:
                        request.channel.put(InvalidParameterError("the model was unloaded", param="model"))
                        request.channel.end()
                    self._waiting.clear()
                    self._worker.ended()
                    return
                picked = self._pick()
            if picked:
                self._decode(picked)

    def _pick(self) -> list[tuple[PooledRequest, int]]:
        """The next decode's sequences: one from each waiting request in turn, as many as fit in
        `n_batch` tokens (one sequence alone when it is longer); requests whose reader left are
        dropped. The next decode starts with the request after this one's first."""
        for request in [r for r in self._waiting if r.channel.cancelled.is_set()]:
            self._waiting.remove(request)
            request.channel.end()
        picked: list[tuple[PooledRequest, int]] = []
        tokens = 0
        budget = self.n_batch
        while len(picked) < self.n_seq_max:
            progressed = False
            for request in list(self._waiting):
                if request.next >= len(request.sequences) or len(picked) >= self.n_seq_max:
                    continue
                size = len(request.sequences[request.next])
                if not picked:
                    budget = max(self.n_batch, size)
                elif tokens + size > budget:
                    continue
                picked.append((request, request.next))
                request.next += 1
                request.pending += 1
                tokens += size
                progressed = True
            if not progressed:
                break
        if self._waiting:
            self._waiting.rotate(-1)
        return picked

    def _decode(self, picked: list[tuple[PooledRequest, int]]) -> None:
        threads = self._governor.threads()
        if threads != self._threads:
            rt.set_threads(self.ctx, threads, threads)
            self._threads = threads
        batch = self._batch
        batch.reset()
        for seq_id, (request, index) in enumerate(picked):
            rt.add_tokens(batch, request.sequences[index], pos=0, seq_id=seq_id, logits=lambda _: True)
        try:
            rt.decode(self.ctx, batch)
            outputs = []
            for seq_id in range(len(picked)):
                pointer = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq_id)
                if not pointer:
                    raise RuntimeError("llama.cpp returned no pooled output")
                outputs.append(np.ctypeslib.as_array(pointer, shape=(self.n_out,)).copy())
        except Exception as exc:  # a decode failure fails the requests in it, not the thread
            log.exception("pooled decode failed")
            outputs = [exc] * len(picked)
        finally:
            rt.clear_memory(self.ctx)
            self.decoded += len(picked)
        with self._wake:
            for (request, index), out in zip(picked, outputs, strict=True):
                request.pending -= 1
                if isinstance(out, Exception):
                    request.channel.put(RuntimeError(f"llama.cpp could not pool input {index}: {out}"))
                    request.next = len(request.sequences)
                elif self.pooling != llama_cpp.LLAMA_POOLING_TYPE_RANK:
                    request.channel.put((index, normalized(out, request.normalize)))
                else:
                    request.channel.put((index, out))
                if request.finished and request in self._waiting:
                    self._waiting.remove(request)
                    request.channel.end()
