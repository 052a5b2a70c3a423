"""The request rules every engine shares, each written once: a prompt's length against the
context, token ids against the vocabulary, and when a choice ends. Plain functions of plain values,
so the Engine base (base.py), the llama.cpp scheduler (scheduler.py, which sees no engine) and the
server (server/generation.py) call the same rule and raise the same message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge_llm.errors import ContextLengthError, InvalidParameterError

if TYPE_CHECKING:
    from edge_llm.engines.base import FinishReason
    from edge_llm.engines.textstream import TextAssembler
    from edge_llm.sampling import SamplingParams


def check_prompt_length(n_prompt: int, n_ctx_seq: int, *, n_ctx: int, flag: str = "-c",
                        param: str = "messages") -> None:
    """Refuse a prompt that leaves a request no room to generate: one request holds at most
    `n_ctx_seq` tokens (prompt + output), a slot's share of the context's `n_ctx` when they differ.
    The message begins as OpenAI's, which clients recognise as a context overflow."""
    if n_prompt < n_ctx_seq:
        return
    share = f" (a slot's share of the {n_ctx}-token context)" if n_ctx_seq < n_ctx else ""
    subject = "messages" if param == "messages" else "prompt"
    raise ContextLengthError(f"This model's maximum context length is {n_ctx_seq} tokens{share}. However, your "
                             f"{subject} resulted in {n_prompt} tokens. Please reduce the length or raise {flag}.",
                             param=param)


def check_token_ids(tokens: Iterable[int], n_vocab: int, *, param: str = "prompt") -> None:
    """Refuse ids outside the vocabulary before any engine sees them: llama.cpp aborts the whole
    process on an out-of-range id inside llama_decode."""
    for t in tokens:
        if not isinstance(t, int) or t < 0 or t >= n_vocab:
            raise InvalidParameterError(f"token id {t!r} is out of range [0, {n_vocab})", param=param)


def check_stop_token_ids(params: SamplingParams, n_vocab: int) -> None:
    """A request's stop_token_ids, named as such in the error."""
    if params.stop_token_ids:
        check_token_ids(params.stop_token_ids, n_vocab, param="stop_token_ids")


# -- the finish rule: whether a sampled token ends its choice -------------------------------------
# Written as two calls so that an engine pushes the token's bytes to its TextAssembler between
# them (and only for a token that is text): `ends_text`, then `finish_after_text`.


def ends_text(token: int, params: SamplingParams, eog_ids: frozenset[int]) -> bool:
    """The token is not text: an end-of-generation token (unless ignore_eos) or a stop token ends
    the choice ("stop") unshown."""
    return (token in eog_ids and not params.ignore_eos) or token in params.stop_token_ids


def finish_after_text(params: SamplingParams, text: TextAssembler, n_generated: int, n_filled: int,
                      n_ctx_seq: int) -> FinishReason | None:
    """Whether the choice ends after a text token (its bytes pushed to `text`): a stop string
    ("stop"), max_tokens reached or the request's context full ("length"). `n_generated` counts
    this token; `n_filled` is the context's tokens as the engine counts them (the scheduler: the
    KV cells its slot holds before this token, which is decoded only if the choice goes on)."""
    if text.stopped:
        return "stop"
    if params.max_tokens is not None and n_generated >= params.max_tokens:
        return "length"
    if n_filled >= n_ctx_seq:
        return "length"
    return None
