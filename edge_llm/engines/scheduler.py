"""Continuous batching on one llama.cpp context.

One engine thread owns the llama_context and every sampler (neither is thread-safe). Each
step it builds one llama_batch holding
  - one token for every sequence that is generating, and
  - prompt chunks of newly admitted requests, within a per-step token budget (n_batch), so a
    long prompt is spread over several steps and never stalls the running streams; shortest
    prompt first, and one prompt finished per step (prefill on a CPU is compute-bound, so
    reading prompts together only delays every first token to the last one's),
then calls llama_decode once (ctypes releases the GIL, so an asyncio server stays responsive)
and samples every sequence that produced logits. Which slot a request takes and what it reuses
are decided in `slots.py` (`place`); what a step runs (generating slots, prompt chunks, image rows,
drafts) is a `step_plan.StepPlan`, made in plain Python by `schedule()` and run by `_execute`;
llama.cpp is called through `llama_runtime.py`; a request's deltas reach its reader through a
`threadbridge.Channel`. The scheduler sees a narrow view of its engine: a `ModelView` (the context,
the vocabulary's facts), a `SchedulerConfig` and an injected `ThreadGovernor`.

Slots and the prompt cache: the context has `n_parallel` sequences (slots), each with its own
n_ctx / n_parallel KV cells (kv_unified = False, so a request's attention never covers another
request's cells and greedy output does not depend on what else runs). A finished request leaves
its tokens in its slot. A new request takes the idle slot whose cached tokens share the longest
prefix with its prompt and evaluates only the rest; with no useful match it takes the least
recently used idle slot. A slot given to another conversation is saved first to the prompt cache
beyond the slots (prompt_cache.py: host memory, optionally a folder), and a prompt that a saved
state covers better than any slot gets that state restored into a slot. Admission is all or
nothing: what can fail for a request is built before any slot is touched.

With -kvu (kv_unified = True) the slots share one pool of n_ctx cells: idle slots give their
cells up (saved first) when a prompt or the running streams need them; a prompt that does not fit
beside the running streams waits; when the running streams fill the pool, the newest ends with
"length".

`n > 1` choices take n slots: the prompt is evaluated once, then copied (llama_memory_seq_cp)
into the other slots, each with its own sampler.

Speculative decoding (--spec): a generating slot may put drafted tokens after its pending one
(speculation.py: a drafter proposes, `plan_drafts` decides how many are worth verifying); every
position is sampled with the slot's own chain, the drafted tokens are kept up to the first that
differs from what was sampled, and the KV cells of the rest are dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from edge_llm.engines import llama_runtime as rt
from edge_llm.engines import rules
from edge_llm.engines.base import Delta, TokenLogprob, Usage
from edge_llm.engines.cpu_threads import ThreadGovernor
from edge_llm.engines.media import has_placeholders, images_of, kv_position, next_image
from edge_llm.engines.projector import VisionWorker
from edge_llm.engines.prompt_cache import PromptCache
from edge_llm.engines.rules import ends_text, finish_after_text
from edge_llm.engines.slots import (
    Slot,
    eviction_order,
    free_cells,
    least_recently_used,
    place,
    slots_for_copies,
)
from edge_llm.engines.speculation import Acceptance, Drafter, StepCost, graph_runs
from edge_llm.engines.step_plan import DraftLimits, StepPlan, plan_step, plan_step_drafts
from edge_llm.engines.textstream import TextAssembler
from edge_llm.engines.threadbridge import Channel
from edge_llm.engines.top_k import TopKFirst
from edge_llm.engines.work_thread import WorkThread
from edge_llm.errors import EdgeLLMError, InvalidParameterError, OverloadedError
from edge_llm.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    """Counters read by /metrics and the tests; written only by the engine thread."""

    prompt_tokens_evaluated: int = 0  # prompt tokens actually run through the model (not reused)
    decode_calls: int = 0
    decodes_with_fewer_threads: int = 0  # while other programs held cores (cpu_threads.ThreadGovernor)
    draft_tokens: int = 0  # drafted tokens verified (speculative decoding)
    accepted_tokens: int = 0  # of those, the ones kept


class Request(Channel[Delta]):
    """One submitted generation: the engine thread writes its deltas, the caller reads them. A
    reader that fell behind gets each choice's waiting deltas as one (`fold_deltas`)."""

    _ids = itertools.count()

    def __init__(self, tokens: list[int], params: SamplingParams) -> None:
        super().__init__(fold=fold_deltas)
        self.id = next(Request._ids)
        self.tokens = tokens
        self.params = params


def fold_deltas(deltas: list[Delta]) -> list[Delta]:
    """Each choice's run of deltas as one (one SSE event instead of one per token). Each choice's
    order is kept, and nothing is merged past a choice's final delta."""
    out: list[Delta] = []
    open_delta: dict[int, int] = {}  # choice index -> position in `out` of its unfinished delta
    for delta in deltas:
        at = open_delta.get(delta.index)
        if at is not None:
            out[at] = _joined(out[at], delta)
        else:
            at = len(out)
            out.append(delta)
        if delta.finish_reason is None:
            open_delta[delta.index] = at
        else:
            open_delta.pop(delta.index, None)
    return out


def _joined(first: Delta, second: Delta) -> Delta:
    logprobs = None if first.logprobs is None and second.logprobs is None else \
        (first.logprobs or []) + (second.logprobs or [])
    return Delta(text=first.text + second.text, token_ids=first.token_ids + second.token_ids, index=first.index,
                 logprobs=logprobs, finish_reason=second.finish_reason, usage=second.usage)


class RequestStream:
    """The caller's handle on a request: iterate for deltas; closing or dropping it cancels the
    request (the scheduler holds the Request itself, so that alone would never be collected)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Delta:
        try:
            delta = self.request.get()
        except BaseException:
            self.close()
            raise
        if delta is None:
            raise StopIteration
        return delta

    def close(self) -> None:
        self.request.cancel()

    def __del__(self) -> None:
        self.request.cancel()


@dataclass
class Choice:
    """One of a request's n outputs, running in one slot."""

    request: Request
    index: int
    sampler: rt.LlamaSampler | TopKFirst  # rt.sampler_chain
    text: TextAssembler
    n_prompt: int
    n_cached: int
    n_restored: int = 0  # of the cached tokens, those restored from the prompt cache
    generated: int = 0
    pending: int | None = None  # sampled token not yet decoded
    done: bool = False
    acceptance: Acceptance | None = None  # of its drafted tokens (speculative decoding)
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class ModelView:
    """What the scheduler uses of the model: the context it decodes on (only its engine thread
    touches it) and the vocabulary's facts. Built by the engine (llamacpp.py)."""

    context: rt.LlamaContext
    vocab: object  # llama_vocab *, for sampler chains
    n_vocab: int
    eog_ids: frozenset[int]
    token_piece: Callable[[int], bytes]  # a token's bytes (special tokens: none)
    token_text: Callable[[int], str]  # a token's own text, for logprobs


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's settings, as the engine resolved them from its load options."""

    n_ctx: int  # the context's KV cells
    n_ctx_seq: int  # one request's share (prompt + output)
    n_parallel: int  # slots (llama.cpp sequences)
    n_batch: int  # tokens per llama_decode
    kv_unified: bool = False  # one pool of n_ctx cells for every slot (-kvu)
    seed: int | None = None  # the context's seed, for requests without one
    max_waiting: int = 64  # queued requests beyond the idle slots (--max-queue)
    n_threads: int = 1  # the context's threads at creation (-t, or every core)
    n_threads_batch: int | None = None  # the user's -tb, or None: follow the governor
    images: bool = False  # a projector is loaded: prompts may hold images (a vision worker encodes them)
    draft_max: int = 16
    draft_min: int = 0


class Scheduler:
    def __init__(self, model: ModelView, config: SchedulerConfig, *, governor: ThreadGovernor,
                 cache: PromptCache | None = None, drafter: Drafter | None = None) -> None:
        self.model = model
        self.config = config
        self.cache = cache  # states of conversations that lost their slot (prompt_cache.py)
        self.drafter = drafter  # speculative decoding (speculation.py); None: off
        self.draft_limits = DraftLimits(n_batch=config.n_batch, n_ctx_seq=config.n_ctx_seq, draft_max=config.draft_max,
                                        draft_min=config.draft_min, unified=config.kv_unified, images=config.images)
        self.cost = StepCost()  # graph run times, for plan_drafts (tests replace it)
        self._acceptance = Acceptance()  # of every choice's drafts: where a new choice starts
        self.ctx = model.context
        self.memory = rt.SequenceMemory(self.ctx)
        self.n_ctx = config.n_ctx
        self.n_ctx_seq = config.n_ctx_seq
        self.unified = config.kv_unified
        self.n_batch = config.n_batch
        self.max_waiting = config.max_waiting
        self.slots = [Slot(i) for i in range(config.n_parallel)]
        self.stats = SchedulerStats()
        self._waiting: deque[Request] = deque()
        # Taken off the queue, not yet in its slots: still waiting for submit's count (its slots
        # still look idle), so a request that arrives meanwhile cannot take its place in the queue.
        self._admitting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._batch = rt.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1)
        self._outbox: list[tuple[Request, Delta | None]] = []  # this step's deltas, None: a request's end
        # The thread count of each decode (cpu_threads.ThreadGovernor: -t or every core, at most;
        # exactly that with --no-adapt-threads). Public: tests put a governor of their own here.
        self.governor = governor
        self._threads_batch = config.n_threads_batch  # the user's -tb, or None: follow the governor
        self._threads_set = (config.n_threads, config.n_threads_batch or config.n_threads)
        # Images: encoded by the vision worker's thread while this one decodes the other slots.
        self.vision = VisionWorker(self._wake) if config.images else None
        self._waiting_on_vision = False  # the last step had nothing to run but slots waiting for images
        self._vision_signal = False  # an image was encoded since the engine thread last looked
        # Decode threads while the vision tower works (0: no change); the engine's cores less the
        # tower's share, at least one.
        self.vision_threads_while_encoding = max(1, config.n_threads // 2) if self.vision is not None else 0
        self._worker = WorkThread("edge-llm-engine", self._run)  # runs while there are requests

    # -- caller side ----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for s in self.slots if not s.idle)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Share of the context's KV cells held by running requests, 0 to 1 (vLLM's
        kv_cache_usage_perc: what an idle slot keeps for a returning conversation can be given up,
        so it counts as free). Read at scrape time from another thread: a gauge, not a promise."""
        held = sum(len(s.cached) + len(s.prefill) for s in list(self.slots) if not s.idle)
        return min(1.0, held / self.n_ctx)

    @property
    def threads(self) -> int:
        """Threads the decodes use now: the cores, or fewer while other programs hold some."""
        return self._threads_set[0]

    @property
    def thread_counts(self) -> tuple[int, int]:
        """The context's threads now: (generation, prompt processing)."""
        return self._threads_set

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine thread between steps: requests submitted inside are seen (and admitted)
        together by its next step."""
        with self._cond:
            yield

    def validate(self, tokens: list[int], params: SamplingParams) -> None:
        """The engine's checks (rules.py) again, for callers that submit directly, and the
        scheduler's own: each choice takes a slot."""
        if not tokens:
            raise InvalidParameterError("the prompt is empty", param="prompt")
        rules.check_prompt_length(len(tokens), self.n_ctx_seq, n_ctx=self.n_ctx)
        if params.n > len(self.slots):
            raise InvalidParameterError(f"n={params.n} exceeds the {len(self.slots)} parallel slots (-np)",
                                        param="n")
        rules.check_stop_token_ids(params, self.model.n_vocab)

    def submit(self, tokens: list[int], params: SamplingParams, *, bind_loop: bool = True) -> Request:
        self.validate(tokens, params)
        request = Request(tokens, params)
        if bind_loop:
            try:
                request.bind(asyncio.get_running_loop())
            except RuntimeError:
                pass
        with self._cond:
            if self._closed:
                raise EdgeLLMError("the engine is closed")
            # Requests that idle slots will take at the next step do not count as waiting.
            idle = sum(1 for s in self.slots if s.idle)
            waiting = sum(1 for r in self._waiting if not r.cancelled.is_set()) + self._admitting
            if waiting - idle >= self.max_waiting:
                raise OverloadedError(f"the server is busy: {len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(request)
            self._worker.start()
            self._cond.notify()
        return request

    def stream(self, tokens: list[int], params: SamplingParams) -> RequestStream:
        return RequestStream(self.submit(tokens, params, bind_loop=False))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker.join(timeout=30):
            self._persist_idle()  # the engine thread is gone: the slots can be read here
            if self.drafter is not None:
                self.drafter.close()
            if self.vision is not None:
                self.vision.close()
        self._batch.close()

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._nothing_to_do():
                self._persist_idle()
            with self._cond:
                if self._nothing_to_do():
                    self._worker.ended()  # the thread ends (engines/work_thread.py says why); submit starts another
                    return
                if self._closed:
                    break
                if self._waiting_on_vision and not self._vision_signal:
                    self._cond.wait(timeout=0.5)  # woken by the vision worker (or a new request)
                self._vision_signal = False
            try:
                self._step()
            except Exception as exc:  # keep serving others; fail only what was running
                log.exception("engine step failed")
                self._fail_running(EdgeLLMError(f"generation failed: {exc}"))
            finally:
                self._flush()
        self._fail_running(EdgeLLMError("the engine was closed"))
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.put(EdgeLLMError("the engine was closed"))
            request.end()
        with self._cond:
            self._worker.ended()

    def _nothing_to_do(self) -> bool:
        return not self._closed and not self._waiting and all(s.idle for s in self.slots)

    def _wake(self) -> None:
        """The vision worker finished an image (its thread)."""
        with self._cond:
            self._vision_signal = True  # not lost if the engine thread is in a step, not waiting
            self._cond.notify()

    def _step(self) -> None:
        self._drop_cancelled()
        if self.vision is not None:
            self._fail_images()
        self._admit()
        plan = self.schedule()
        if plan.images:
            self._decode_images(plan.images)  # own decodes, before the batch whose logits are sampled
        if self.drafter is not None and plan.generating:
            plan.drafts = self._plan_drafts(plan)
        self._execute(plan)

    def schedule(self) -> StepPlan:
        """This step's slots and prompt chunks (step_plan.py); drafts are planned once its image
        rows are in."""
        plan = plan_step(self.slots, n_batch=self.n_batch, images=self.vision is not None)
        self._waiting_on_vision = plan.waiting_on_vision
        return plan

    def _plan_drafts(self, plan: StepPlan) -> dict[int, list[int]]:
        pool_room = self._free_cells() - self.running if self.unified else None
        return plan_step_drafts(plan, self.drafter, self.cost, self.draft_limits, pool_room=pool_room)

    def _execute(self, plan: StepPlan) -> None:
        """One llama_decode for the plan's batch, then the sampling of what it produced: the first
        token of each prompt finished this step (and its copies'), and each generating slot's
        pending and drafted positions."""
        generating, chunks, drafts = plan.generating, plan.chunks, plan.drafts
        batch = self._batch
        batch.reset()
        verifying: list[tuple[Slot, list[int], int]] = []  # generating slots, their drafts, their first logits index
        prefilled: list[tuple[Slot, int]] = []  # slots whose prompt ends this step, and its logits index
        counts: list[tuple[int, int]] = []
        # In sequence order: llama.cpp runs consecutive sequences with equal token counts as one graph.
        for slot in self.slots:
            if slot in generating:
                draft = drafts.get(slot.seq_id, [])
                tokens = [slot.choice.pending, *draft]
                last = self._add(slot, tokens, outputs=len(tokens))
                verifying.append((slot, draft, last - len(draft)))
            elif slot.seq_id in chunks:
                n = chunks[slot.seq_id]
                tokens = slot.prefill[:n]
                ends = n == len(slot.prefill)
                index = self._add(slot, tokens, outputs=1 if ends else 0)
                slot.prefill = slot.prefill[n:]
                if ends:
                    prefilled.append((slot, index))
            else:
                continue
            counts.append((slot.seq_id, len(tokens)))
        if batch.n_tokens() == 0:
            return
        self._set_threads()
        self._flush()  # the last step's deltas, read while llama_decode runs without the GIL
        self.stats.decode_calls += 1
        self.stats.decodes_with_fewer_threads += self._threads_set[0] < self.governor.limit
        start = time.perf_counter()
        rt.decode(self.ctx, batch)
        if self.drafter is not None and not chunks and len(graph_runs(counts, unified=self.unified)) == 1:
            self.cost.observe(batch.n_tokens(), time.perf_counter() - start)
        for slot, index in prefilled:
            self._copy_prompt(slot)
            for target in [slot, *slot.copies]:
                self._sample(target, index)
            slot.copies = []
        for slot, draft, first in verifying:
            self._verify(slot, draft, first)

    # -- images (engines/media.py, engines/projector.py) ----------------------------------------

    def _fail_images(self) -> None:
        """Requests whose image the vision encoder could not encode get its error."""
        for slot in self.slots:
            if not slot.prefill:
                continue
            span = next_image(len(slot.cached), images_of(slot.choice.request.tokens))
            if span is not None and span.error is not None:
                request = slot.choice.request
                for other in self.slots:
                    if other.choice is not None and other.choice.request is request:
                        self._release(other)
                _release_media(request)
                request.put(span.error)
                request.end()

    def _decode_images(self, rows: dict[int, int]) -> None:
        """The plan's image rows into their slots (seq_id -> rows, in slot order)."""
        slots = self.slots
        for seq_id, n in rows.items():
            slot = slots[seq_id]
            images = images_of(slot.choice.request.tokens)
            at = len(slot.cached)
            span = next_image(at, images)
            chunk = span.chunk
            first = at - span.start
            positions = chunk.positions(kv_position(span.start, images))[:, first:first + n]
            self._set_threads()
            self._flush()  # the last step's deltas go out while the image rows are decoded
            self.stats.decode_calls += 1
            rt.decode_embeddings(self.ctx, span.embeddings[first:first + n], positions, slot.seq_id,
                                 non_causal=chunk.non_causal)
            slot.cached.extend(slot.prefill[:n])
            slot.prefill = slot.prefill[n:]
            if at + n == span.end:
                span.release()  # in the KV now: its pixels and embeddings can go

    def _set_threads(self) -> None:
        """Threads for this decode, as the governor says (fewer while other programs hold cores);
        a -tb of its own gives up as many threads as -t does."""
        n = self.governor.threads()
        if self.vision is not None and self.vision.busy and self.vision_threads_while_encoding:
            # The vision tower runs on the same cores now: decode on what it leaves (at least one
            # thread, which has no barriers to spin at).
            n = min(n, self.vision_threads_while_encoding)
        batch = max(1, self._threads_batch - (self.governor.limit - n)) if self._threads_batch else n
        wanted = (n, batch)
        if wanted != self._threads_set:
            log.debug("threads %d -> %d (other programs use %.2f cores)", self._threads_set[0], n,
                      self.governor.others)
            rt.set_threads(self.ctx, *wanted)
            self._threads_set = wanted

    def _add(self, slot: Slot, tokens: list[int], *, outputs: int) -> int:
        """Append tokens of one sequence to the batch, the last `outputs` of them wanting logits;
        return the batch index of the last one."""
        if len(slot.cached) + len(tokens) > self.n_ctx_seq:  # never hand llama.cpp a cell past the slot
            raise RuntimeError(f"position {len(slot.cached) + len(tokens)} past the slot size {self.n_ctx_seq}")
        pos = kv_position(len(slot.cached), images_of(slot.choice.request.tokens)) if slot.choice else len(slot.cached)
        first_output = len(tokens) - outputs
        index = rt.add_tokens(self._batch, tokens, pos=pos, seq_id=slot.seq_id,
                              logits=lambda i: i >= first_output)
        slot.cached.extend(tokens)
        return index

    # -- speculative decoding -------------------------------------------------------------------

    def _verify(self, slot: Slot, draft: list[int], first: int) -> None:
        """Sample the pending token's position and each drafted one in turn, as many as agree with
        the draft (each sample is what decoding without speculation gives there); then drop the KV
        of the drafted tokens that were not kept."""
        choice = slot.choice
        base = len(slot.cached) - len(draft) - 1  # the pending token's position
        # Counted before sampling: the usage of a choice that finishes inside the draft includes them.
        choice.drafted += len(draft)
        accepted = 0
        for i in range(len(draft) + 1):
            token = self._sample(slot, first + i, held=base + 1 + i)
            if choice.done or i == len(draft) or token != draft[i]:
                break
            accepted += 1
            choice.accepted += 1
        if not draft:
            choice.acceptance.recover()
            return
        self._truncate(slot, base + 1 + accepted)
        choice.acceptance.update(len(draft), accepted)
        self._acceptance.update(len(draft), accepted)
        self.stats.draft_tokens += len(draft)
        self.stats.accepted_tokens += accepted

    # -- admission ------------------------------------------------------------------------------

    def _admit(self) -> None:
        if self.unified:
            self._keep_decode_room()
        while True:
            with self._cond:
                if not self._waiting:
                    return
                request = self._waiting[0]
                idle = [s for s in self.slots if s.idle]
                if len(idle) < request.params.n:
                    return  # first come, first served: later requests wait behind it
                self._waiting.popleft()
                self._admitting = 1
            try:
                if not self._admit_one(request, idle):
                    return
            finally:
                with self._cond:
                    self._admitting = 0

    def _admit_one(self, request: Request, idle: list[Slot]) -> bool:
        """Start one request taken off the queue; False: it went back to the queue's head."""
        if request.cancelled.is_set():
            request.end()
            return True
        if self.unified and not self._make_room(request.tokens, idle):
            with self._cond:  # the running streams hold the pool: wait for them to end
                self._waiting.appendleft(request)
                self._admitting = 0  # counted once, in the queue again
            return False
        try:
            self._start(request, idle)
        except Exception as exc:
            request.put(exc if isinstance(exc, EdgeLLMError) else EdgeLLMError(str(exc)))
            request.end()
        return True

    def _start(self, request: Request, idle: list[Slot]) -> None:
        """Admit a request into idle slots, all or nothing: everything that can fail for a bad
        request (its samplers, where a grammar is parsed) is built before any slot is touched,
        so a failure leaves the slots, and the streams running beside them, as they were."""
        tokens, params = request.tokens, request.params
        choices = self._make_choices(request)
        main, reuse, restored = self._place(tokens, idle)
        others = slots_for_copies(idle, main, params.n)
        for slot in others:  # their caches are overwritten: keep them first
            self._save(slot)
        main.prefill = tokens[reuse:]
        for slot, choice in zip([main, *others], choices, strict=False):
            choice.n_cached, choice.n_restored = reuse, restored
            slot.choice = choice
            slot.last_used = time.monotonic()
        main.copies = others
        self.stats.prompt_tokens_evaluated += len(tokens) - reuse
        for span in images_of(tokens):
            if span.end <= reuse:
                request.tokens.release_span(span)  # already in the slot: nothing to encode
            elif not span.queued:
                self.vision.submit(span, request.cancelled.is_set)

    def _place(self, tokens: list[int], idle: list[Slot]) -> tuple[Slot, int, int]:
        """Pick the slot for a prompt and make it hold the longest cached prefix there is: its
        own, or a saved state restored from the prompt cache. Returns the slot, how many prompt
        tokens it holds, and how many of those were restored."""
        running = [s.seq_id for s in self.slots if not s.idle]
        images = images_of(tokens)
        saved = self.cache.lookup(tokens) if self.cache is not None else None
        plan = place(tokens, idle, running, unified=self.unified, images=images, saved=saved,
                     free=self._free_cells() if self.unified and saved is not None else 0)
        main, reuse = plan.slot, plan.reuse
        if plan.entry is not None:
            target, entry = plan.target, plan.entry
            state = self.cache.load(entry)
            if state is not None:
                self._save(target)
                if self._restore(target, state, entry.tokens.tolist()):
                    self._truncate(target, plan.found, images)
                    found = len(target.cached)  # less if the tail could not be cut
                    self.cache.note_restore(found)
                    return target, found, found
                self.cache.discard(entry)
                if target is main:
                    reuse = 0
        if reuse < len(main.cached):
            self._save(main)
        self._truncate(main, reuse, images)
        return main, len(main.cached), 0

    def _make_choices(self, request: Request) -> list[Choice]:
        choices: list[Choice] = []
        try:
            for i in range(request.params.n):
                choices.append(self._make_choice(request, i, len(request.tokens), 0))
        except BaseException:
            for choice in choices:
                choice.sampler.close()
            raise
        return choices

    def _make_choice(self, request: Request, index: int, n_prompt: int, n_cached: int) -> Choice:
        params = request.params
        seed = self.config.seed if params.seed is None else params.seed
        if seed is not None:
            seed += index  # n choices from one seed must still differ
        last_n = self.n_ctx_seq if params.penalty_last_n < 0 else params.penalty_last_n
        model = self.model
        sampler = rt.sampler_chain(params, vocab=model.vocab, n_vocab=model.n_vocab, eog_ids=model.eog_ids,
                                   penalty_last_n=last_n, seed=seed)
        if not params.grammar and params.repetition_penalty != 1.0:
            # vLLM and llama-server apply the repetition penalty to prompt tokens too.
            for token in request.tokens[-last_n:] if last_n else []:
                if token >= 0:  # not an image's placeholder
                    sampler.accept(token)
        return Choice(request, index, sampler, TextAssembler(params.stop, params.include_stop_str_in_output),
                      n_prompt, n_cached, acceptance=self._acceptance.start())

    def _truncate(self, slot: Slot, keep: int, images: tuple = ()) -> None:
        """Drop the slot's cached tokens past `keep` (`images`: the spans of the prompt its tokens
        belong to, default the running request's: they place the cut with M-RoPE)."""
        if len(slot.cached) > keep:
            images = images or (images_of(slot.choice.request.tokens) if slot.choice is not None else ())
            if not self.memory.cut(slot.seq_id, kv_position(keep, images)):
                # Some memory types cannot drop a tail; then start the sequence over.
                self.memory.clear(slot.seq_id)
                keep = 0
            del slot.cached[keep:]

    def _copy_prompt(self, slot: Slot) -> None:
        for target in slot.copies:
            self.memory.copy(slot.seq_id, target.seq_id)
            target.cached = list(slot.cached)

    # -- unified KV (-kvu): one pool of n_ctx cells for every slot ------------------------------

    def _free_cells(self) -> int:
        return free_cells(self.slots, self.n_ctx)

    def _evict(self, slot: Slot) -> None:
        """Free an idle slot's cells; what it held goes to the prompt cache first."""
        self._save(slot)
        self.memory.clear(slot.seq_id)
        slot.cached = []

    def _make_room(self, tokens: list[int], idle: list[Slot]) -> bool:
        """Free idle slots' cells, least recently used first, until the prompt and one more
        token per running stream fit. The idle slot that shares most with the prompt goes last."""
        need = len(tokens) + sum(1 for s in self.slots if not s.idle)
        for slot in eviction_order(idle, tokens):
            if self._free_cells() >= need:
                break
            self._evict(slot)
        return self._free_cells() >= need

    def _keep_decode_room(self) -> None:
        """Each generating slot takes one more cell this step. When the pool is short, idle
        slots give theirs up; when only running streams are left, the newest one ends with
        finish_reason "length", as a full slot does without -kvu."""
        while True:
            need = sum(1 for s in self.slots if s.choice is not None and not s.choice.done)
            if self._free_cells() >= need:
                return
            idle = [s for s in self.slots if s.idle and s.cached]
            if idle:
                self._evict(least_recently_used(idle))
                continue
            running = [s for s in self.slots if s.choice is not None and not s.choice.done]
            if not running:
                return
            newest = max(running, key=lambda s: (s.choice.request.id, s.choice.index))
            self._finish(newest, "length")

    # -- the prompt cache beyond the slots ------------------------------------------------------

    def _save(self, slot: Slot, *, in_memory: bool = True) -> None:
        """Keep what a slot holds in the prompt cache before it is given to another conversation
        (or, `in_memory=False`, only write it to the disk tier)."""
        if self.cache is None or not slot.cached:
            return
        if self.cache.covers(slot.cached, tier="ram" if in_memory else "disk"):
            return
        state = self.memory.read_state(slot.seq_id)
        if state is not None:
            self.cache.store(slot.cached, state, in_memory=in_memory)

    def _restore(self, slot: Slot, state: bytes | bytearray, tokens: list[int]) -> bool:
        """Put a saved state into a slot: afterwards the slot holds exactly `tokens`."""
        self.memory.clear(slot.seq_id)
        slot.cached = []
        # A state read from a file is checked like any input: llama.cpp rejects bytes it cannot
        # parse; the cells it restored must also be exactly positions 0..n-1, or the state does
        # not stand for these tokens (a forged or mislabelled file).
        if not (self.memory.write_state(slot.seq_id, state)
                and _positions_fit(self.memory.positions(slot.seq_id), tokens, window=self.memory.window)):
            log.warning("prompt cache: llama.cpp could not restore a state of %d tokens; evaluating instead",
                        len(tokens))
            self.memory.clear(slot.seq_id)
            return False
        slot.cached = list(tokens)
        return True

    def _persist_idle(self) -> None:
        """With a disk tier, write what the idle slots hold while nothing else runs: a server or
        REPL that is killed rather than closed still resumes from its last finished turn."""
        if self.cache is not None and self.cache.persistent:
            for slot in self.slots:
                if slot.idle:
                    self._save(slot, in_memory=False)

    # -- sampling and output --------------------------------------------------------------------

    def _sample(self, slot: Slot, index: int, *, held: int | None = None) -> int | None:
        """Sample the choice's next token from the logits at `index` and send it; `held`: the
        tokens the slot's KV holds before it (default: all it caches). Returns the token."""
        choice = slot.choice
        if choice is None or choice.done:
            return None
        held = len(slot.cached) if held is None else held
        params = choice.request.params
        model = self.model
        logprobs = self._logprobs(index, params.logprobs) if params.logprobs is not None else None
        if _plain_greedy(params):
            token = self._argmax(index, model.eog_ids if params.ignore_eos else frozenset())
        else:
            # llama_sampler_sample also accepts the token into the chain (penalty history, grammar
            # state): accepting it again would count it twice and break grammars.
            token = choice.sampler.sample(self.ctx, index)
        choice.generated += 1
        if logprobs is not None:
            logprobs = [self._token_logprob(token, *logprobs)]

        if ends_text(token, params, model.eog_ids):
            finish, text = "stop", ""
        else:
            text = choice.text.push(model.token_piece(token))
            finish = finish_after_text(params, choice.text, choice.generated, held, self.n_ctx_seq)
        if finish is not None:
            text += choice.text.finish()
            self._finish(slot, finish, text, [token], logprobs)
        else:
            choice.pending = token
            self._outbox.append((choice.request, Delta(text=text, token_ids=[token], index=choice.index,
                                                       logprobs=logprobs)))
        return token

    def _argmax(self, index: int, banned: frozenset[int]) -> int:
        """Greedy sampling over the raw logits: the token llama.cpp's greedy sampler picks (the
        first of equal maxima), without building its 49k-entry candidate array every token."""
        logits = rt.logits(self.ctx, index, self.model.n_vocab)
        token = int(logits.argmax())
        if token in banned:  # ignore_eos: the best token that does not end the generation
            logits = logits.copy()
            logits[list(banned)] = -np.inf
            token = int(logits.argmax())
        return token

    def _logprobs(self, index: int, top_n: int) -> tuple[np.ndarray, int]:
        logits = rt.logits(self.ctx, index, self.model.n_vocab).astype(np.float64)
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum()), top_n

    def _token_logprob(self, token: int, logprobs: np.ndarray, top_n: int) -> TokenLogprob:
        top = []
        if top_n:
            best = np.argpartition(-logprobs, top_n)[:top_n]
            best = best[np.argsort(-logprobs[best])]
            top = [(self.model.token_text(int(t)), float(logprobs[t])) for t in best]
        return TokenLogprob(token, self.model.token_text(token), float(logprobs[token]), top)

    def _finish(self, slot: Slot, reason: str, text: str = "", token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None) -> None:
        choice = slot.choice
        choice.done = True
        usage = Usage(prompt_tokens=choice.n_prompt, completion_tokens=choice.generated,
                      cached_tokens=choice.n_cached, restored_tokens=choice.n_restored,
                      draft_tokens=choice.drafted, accepted_tokens=choice.accepted)
        request = choice.request
        self._outbox.append((request, Delta(text=text, token_ids=token_ids or [], index=choice.index,
                                            logprobs=logprobs, finish_reason=reason, usage=usage)))
        self._release(slot)
        if not any(s.choice is not None and s.choice.request is request for s in self.slots):
            _release_media(request)
            self._outbox.append((request, None))

    def _flush(self) -> None:
        """Hand the deltas sampled since the last flush to their readers, all at once, in order.

        Called just before llama_decode (which releases the GIL) and at the end of each step, not
        as each token is sampled: the first delta wakes the server's event loop, whose thread then
        competes for the GIL with this one while it samples the other slots and builds the next
        batch; measured on the 2-core VM, the engine thread spent 7-10 ms of each step waiting
        (on its own CPU time of 0.4-1.1 ms) between one decode and the next. Handed over here, the
        event loop turns them into SSE events while the model runs."""
        outbox, self._outbox = self._outbox, []
        for request, delta in outbox:
            if delta is None:
                request.end()
            else:
                request.put(delta)

    def _release(self, slot: Slot) -> None:
        if slot.choice is not None:
            slot.choice.sampler.close()
        slot.choice = None
        slot.prefill = []
        slot.copies = []
        slot.last_used = time.monotonic()

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            _release_media(request)
            request.end()
        for slot in self.slots:
            if slot.choice is not None and slot.choice.request.cancelled.is_set():
                # Tokens already evaluated stay cached: a retried request can reuse them.
                self._finish(slot, "cancelled")

    def _fail_running(self, error: EdgeLLMError) -> None:
        self._flush()  # what was sampled before the failure comes first
        requests = {s.choice.request for s in self.slots if s.choice is not None}
        for slot in self.slots:
            if slot.choice is not None:
                self._release(slot)
                # The KV of a failed step is unknown: forget it.
                self.memory.clear(slot.seq_id)
                slot.cached = []
        for request in requests:
            _release_media(request)
            request.put(error)
            request.end()


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing that changes the logits or keeps state between tokens (penalties,
    grammars, logit_bias): then the argmax of the logits is exactly what the sampler chain would return."""
    return (params.greedy and not params.grammar and not params.logit_bias and params.repetition_penalty == 1.0
            and not params.frequency_penalty and not params.presence_penalty)


def _release_media(request: Request) -> None:
    if images_of(request.tokens):
        request.tokens.release()


def _positions_fit(positions: tuple[int, int], tokens: list[int], *, window: int = 0) -> bool:
    """Whether a restored state's KV positions are those of `tokens`: exactly 0..n-1, or, where
    image placeholders are among them (M-RoPE images take fewer positions than cells), from 0 and
    no further than n-1. With a sliding `window` the positions reported are the window layers',
    and a saved state holds only what the last position still sees: they start at most at
    n - window (llama_runtime.SequenceMemory)."""
    low, high = positions
    lowest = max(0, len(tokens) - window) if window else 0
    if has_placeholders(tokens):
        return 0 <= low <= lowest and high <= len(tokens) - 1
    return 0 <= low <= lowest and high == len(tokens) - 1
