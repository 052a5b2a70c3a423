"""The draft-model drafter (`-md MODEL`, llama-server's --model-draft): a small model with the
target's vocabulary proposes the tokens that likely follow, greedily.

It keeps its own llama.cpp context, CPU by default, with one sequence per target slot, and
remembers what each sequence holds. A call cuts each sequence to what it shares with the slot's
tokens (the rejected part of the last draft goes), evaluates the rest, then drafts all slots
together, one token per llama_decode. The drafted tokens stay in the draft's KV: next call, the
accepted ones are already there.

Thread model: the scheduler's engine thread is the only caller, as for its own context (a
llama_context is not thread-safe), so nothing here locks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_llm.engines import llama_runtime as rt
from edge_llm.engines.slots import common_prefix
from edge_llm.errors import ModelLoadError
from edge_llm.load_options import LoadOptions

if TYPE_CHECKING:
    from edge_llm.engines.llamacpp import LlamaCppEngine

# llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE and SPEC_VOCAB_CHECK_START_TOKEN_ID (common/speculative.cpp):
# models of one family often pad their vocabularies differently, and the first ids are control
# tokens that fine-tunes rename.
MAX_VOCAB_SIZE_DIFFERENCE = 128
FIRST_COMPARED_TOKEN = 5
# A draft stops at a token the draft model gives less than this probability. llama.cpp's draft-simple
# cut at 0.75 (of the top-10 candidates renormalised) while it drafted up to 16 tokens; it now drafts 3
# and cuts at 0, the length doing the bounding. Here the scheduler asks for as many as it wants, so the
# cut decides the length: a token the draft itself doubts is rarely accepted, and drafting past it costs
# a draft decode per token and a wider verification for nothing. 0.75 of the full softmax (a little
# stricter than of the top 10).
DEFAULT_P_MIN = 0.75


def check_compatible(target: Mapping, draft: Mapping) -> str | None:
    """What keeps `draft` from drafting for `target`, or None. Each is vocab_facts' mapping: the
    vocabulary type, add_bos / bos, add_eos / eos, and every token's text."""
    for key, what in (("type", "vocabulary type"), ("add_bos", "adds-BOS flag"), ("add_eos", "adds-EOS flag")):
        if target[key] != draft[key]:
            return f"{what} {draft[key]} (the target's: {target[key]})"
    for flag, key in (("add_bos", "bos"), ("add_eos", "eos")):
        if target[flag] and target[key] != draft[key]:
            return f"{key.upper()} token {draft[key]} (the target's: {target[key]})"
    n_target, n_draft = len(target["texts"]), len(draft["texts"])
    if abs(n_target - n_draft) > MAX_VOCAB_SIZE_DIFFERENCE:
        return f"{n_draft} tokens (the target's: {n_target}; at most {MAX_VOCAB_SIZE_DIFFERENCE} apart)"
    for token in range(FIRST_COMPARED_TOKEN, min(n_target, n_draft)):
        if target["texts"][token] != draft["texts"][token]:
            return f"token {token} is {draft['texts'][token]!r} (the target's: {target['texts'][token]!r})"
    return None


def vocab_facts(vocab: rt.llama_cpp.llama_vocab_p) -> dict:
    return {**rt.vocab_specials(vocab), "texts": rt.vocab_texts(vocab)}


@dataclass
class _Draft:
    """One slot's work in one call."""

    seq_id: int
    pos: int  # where the next token evaluated goes
    pending: list[int]  # tokens still to evaluate before drafting
    limit: int  # the most tokens to propose
    proposed: list[int] = field(default_factory=list)
    index: int = -1  # the batch index of this slot's logits in the last decode


class DraftModel:
    """Drafter on a second, small GGUF model (see the module docstring)."""

    costly = True  # a decode per drafted token

    def __init__(self, path: Path, target: LlamaCppEngine, *, n_parallel: int, n_ctx_seq: int, n_threads: int,
                 n_gpu_layers: int = 0, n_batch: int = 512, p_min: float = DEFAULT_P_MIN,
                 verbose: bool = False) -> None:
        rt.check_gguf_file(path)
        self.path = path
        self.p_min = p_min
        self.n_ctx_seq = n_ctx_seq
        self._eog_ids = target.eog_ids
        self._model = rt.load_model(path, LoadOptions(n_gpu_layers=n_gpu_layers, verbose=verbose).resolve())
        self._context: rt.LlamaContext | None = None
        self._batch: rt.LlamaBatch | None = None
        try:
            differs = check_compatible(vocab_facts(target.vocab), vocab_facts(self._model.vocab))
            if differs:
                raise ModelLoadError(f"draft model {path} does not share the vocabulary of {target.path}: {differs}")
            self.n_vocab = self._model.n_vocab()
            # Drafts are the target's tokens: ids past its vocabulary are never proposed.
            self._n_proposable = min(self.n_vocab, target.n_vocab)
            # llama.cpp caps the batch at the context; it must hold one drafted token per sequence.
            n_ctx = n_ctx_seq * n_parallel
            n_batch = max(min(n_batch, n_ctx), n_parallel)
            # kv_unified off: each sequence owns n_ctx_seq cells, like the target's slots by default.
            params = rt.context_params(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_parallel,
                                       n_threads=n_threads, kv_unified=False)
            self._context = rt.new_context(self._model, params, verbose=verbose, what=f"a draft context for {path}")
            self._batch = rt.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)
        except BaseException:
            self.close()
            raise
        self.n_batch = n_batch
        self._memory = rt.SequenceMemory(self._context)
        self._held: dict[int, list[int]] = {}  # sequence -> the tokens its KV holds, from position 0

    def propose(self, wanted: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        """Drafter.propose: greedy drafts, each cut at p_min, after an end of generation, and where
        its sequence (n_ctx_seq) ends; a slot with nothing to draft is left out."""
        drafts = [d for seq_id, (tokens, n) in wanted.items() if (d := self._prepare(seq_id, list(tokens), n))]
        try:
            self._evaluate(drafts)
            self._draft(drafts)
        except BaseException:
            for d in drafts:  # what a failed decode left in these sequences is unknown: start them over
                self._memory.clear(d.seq_id)
                self._held.pop(d.seq_id, None)
            raise
        return {d.seq_id: d.proposed for d in drafts}

    def _prepare(self, seq_id: int, tokens: list[int], n: int) -> _Draft | None:
        """Cut the sequence to what it shares with `tokens`; None when there is nothing to draft."""
        # Proposed tokens take positions len(tokens) .. len(tokens) + limit - 1, all inside the sequence.
        limit = min(n, self.n_ctx_seq - len(tokens))
        if limit <= 0 or not tokens:
            return None
        held = self._held.get(seq_id, [])
        # The last token is evaluated again even when held: its logits give the first draft.
        keep = min(common_prefix(held, tokens), len(tokens) - 1)
        if not self._memory.cut(seq_id, keep):
            self._memory.clear(seq_id)
            keep = 0
        self._held[seq_id] = tokens[:keep]
        return _Draft(seq_id, pos=keep, pending=tokens[keep:], limit=limit)

    def _evaluate(self, drafts: list[_Draft]) -> None:
        """Evaluate every slot's missing tokens, several slots per decode, in chunks of the batch
        size; a slot's first draft token is chosen right after the decode that reads its last one
        (the logits are gone at the next decode)."""
        reading = [d for d in drafts if d.pending]
        while reading:
            self._batch.reset()
            finished = []
            for d in reading:
                room = self.n_batch - self._batch.n_tokens()
                if room <= 0:
                    break
                chunk, d.pending = d.pending[:room], d.pending[room:]
                last = not d.pending
                d.index = self._add(d, chunk, logits=last)
                if last:
                    finished.append(d)
            rt.decode(self._context, self._batch)
            for d in finished:
                self._choose(d)
            reading = [d for d in reading if d.pending]

    def _draft(self, drafts: list[_Draft]) -> None:
        """Decode each slot's latest proposed token to draft the next, all slots in one decode."""
        drafting = [d for d in drafts if self._wants_more(d)]
        while drafting:
            self._batch.reset()
            for d in drafting:
                d.index = self._add(d, d.proposed[-1:], logits=True)
            rt.decode(self._context, self._batch)
            drafting = [d for d in drafting if self._choose(d) and self._wants_more(d)]

    def _wants_more(self, d: _Draft) -> bool:
        """Whether `d` drafted a token and may follow it: not at its limit, not past an end of generation."""
        return bool(d.proposed) and len(d.proposed) < d.limit and d.proposed[-1] not in self._eog_ids

    def _choose(self, d: _Draft) -> bool:
        """Propose the draft model's most likely next token unless it doubts it (below p_min)."""
        logits = rt.logits(self._context, d.index, self.n_vocab)
        token = int(np.argmax(logits[:self._n_proposable]))
        top = float(logits.max())
        p = float(np.exp(logits[token] - top) / np.exp(logits - top).sum())
        if p < self.p_min:
            return False
        d.proposed.append(token)
        return True

    def _add(self, d: _Draft, tokens: list[int], *, logits: bool) -> int:
        last = len(tokens) - 1
        index = rt.add_tokens(self._batch, tokens, pos=d.pos, seq_id=d.seq_id, logits=lambda i: logits and i == last)
        d.pos += len(tokens)
        self._held[d.seq_id].extend(tokens)
        return index

    def close(self) -> None:
        for name in ("_batch", "_context", "_model"):
            resource = getattr(self, name, None)
            if resource is not None:
                resource.close()
                setattr(self, name, None)

