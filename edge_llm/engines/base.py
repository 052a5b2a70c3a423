"""The Engine base every front end talks to, and the registry of engines.

The server, the REPL and the batch runner only see this interface, so swapping llama.cpp for
transformers or vLLM changes nothing above it.
"""

from __future__ import annotations

import asyncio
import importlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from edge_llm.chat_tokens import ChatPrompt, ControlToken, ControlTokens, chat_tokens, render_chat
from edge_llm.engines import rules
from edge_llm.engines.media import MediaPrompt, MediaTokens
from edge_llm.errors import EdgeLLMError, InvalidParameterError, MissingExtraError
from edge_llm.load_options import LoadOptions
from edge_llm.model_kind import Kind
from edge_llm.sampling import SamplingParams

if TYPE_CHECKING:
    from edge_llm.chat_format import ChatFormatter
    from edge_llm.engines.textstream import TextAssembler

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens that came from the prompt cache instead of being evaluated again.
    cached_tokens: int = 0
    # Of those, the ones restored from a saved state (host memory or disk) rather than found
    # still in the request's slot.
    restored_tokens: int = 0
    # Speculative decoding: drafted tokens verified, and of those the ones kept.
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Embeddings:
    """Pooled vectors, one per input, and the tokens evaluated to make them."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class Scores:
    """Rerank scores, one per document (in the documents' order), and the tokens evaluated."""

    scores: list[float]
    prompt_tokens: int


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of one choice's output. The last Delta of a choice has `finish_reason` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    index: int = 0  # which of the n choices
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # on the last Delta of a choice


@dataclass(frozen=True)
class CacheTierStats:
    """One tier of a prompt cache (host memory or disk): bytes held, the budget, states dropped."""

    held_bytes: int
    budget_bytes: int
    evictions: int


@dataclass(frozen=True)
class EngineStats:
    """What an engine reports at scrape time (/metrics): its gauges and the counters it keeps. An
    engine without a scheduler of its own reports its slots and nothing running."""

    slots: int = 1  # requests decoded at once (-np)
    running: int = 0  # requests decoding in a slot
    waiting: int = 0  # requests queued for a slot
    kv_usage: float = 0.0  # share of the KV cells held by running requests, 0 to 1
    threads: int | None = None  # threads a decode uses now; None: the engine does not say
    decodes_with_fewer_threads: int = 0
    cache_ram: CacheTierStats | None = None  # the prompt cache beyond the slots, by tier
    cache_disk: CacheTierStats | None = None


class Engine(ABC):
    """What the front ends (server, REPL, batch, bench) use of an engine, and what engines share.

    An engine writes its vocabulary (`tokenize`, `token_piece`, `token_text`), its decoding
    (`_stream`, `_generate`: prompt tokens already checked) and `close`; the prompt checks, chat
    rendering, stream/generate glue and the finish-reason rule are here, written once."""

    name: ClassVar[str]
    model_name: str
    # What the model is for (model_kind.py): "chat" generates; "embedding" and "rerank" models only
    # pool (their routes and commands refuse the others, and generating routes refuse them).
    kind: Kind = "chat"
    n_ctx: int  # the whole context, in tokens
    n_vocab: int
    eog_ids: frozenset[int] = frozenset()  # tokens that end a generation
    formatter: ChatFormatter  # renders chat messages to the prompt text
    # Message content may write control tokens that count as the template's (--trust-content-markup):
    # only for trusted clients. Off: content is text (chat_tokens.py).
    trust_content_markup: bool = False
    n_parallel: int = 1  # requests decoded at once (llama.cpp's slots; batch runs size their concurrency to it)
    grammars: ClassVar[bool] = True  # honours SamplingParams.grammar
    # The flag that raises the context, named in the error for a prompt that does not fit.
    context_flag: ClassVar[str] = "-c"
    # The registry entry's sampling defaults (temperature ...), for what a request leaves unset.
    sampling_defaults: dict[str, Any] = {}  # noqa: RUF012 (replaced, never changed in place)

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one request may hold (prompt + output)."""
        return self.n_ctx

    @classmethod
    def check_options(cls, options: LoadOptions) -> None:
        """Refuse, before any model is loaded, resolved options this engine would refuse at load:
        `serve` checks every model's at start, so a bad value is one line then, not an error at
        its first request."""
        from edge_llm.chat_format import check_chat_format

        check_chat_format(options.chat_format)

    # -- vocabulary -------------------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Text to token ids; add_bos None: the beginning-of-sequence token where the model wants it."""

    @abstractmethod
    def control_token_list(self) -> list[ControlToken]:
        """The vocabulary's control tokens: the texts tokenize(special=True) turns into one token
        and tokenize(special=False) leaves as text."""

    @cached_property
    def control_tokens(self) -> ControlTokens:
        return ControlTokens(self.control_token_list())

    @abstractmethod
    def token_piece(self, token: int) -> bytes:
        """The bytes of one token; special tokens (e.g. <|im_end|>) render as nothing."""

    @abstractmethod
    def token_text(self, token: int) -> str:
        """The token's own text, special tokens included (for templates and logprobs)."""

    def detokenize(self, tokens: list[int]) -> str:
        return self.detokenize_bytes(tokens).decode("utf-8", errors="replace")

    def detokenize_bytes(self, tokens: list[int]) -> bytes:
        self.check_token_ids(tokens)
        return b"".join(self.token_piece(t) for t in tokens)

    def check_token_ids(self, tokens: list[int], *, param: str = "prompt") -> None:
        rules.check_token_ids(tokens, self.n_vocab, param=param)

    def check_prompt_length(self, n_prompt: int, *, param: str = "messages") -> None:
        """Refuse a prompt that leaves no room in a request's share of the context (rules.py)."""
        rules.check_prompt_length(n_prompt, self.n_ctx_seq, n_ctx=self.n_ctx, flag=self.context_flag, param=param)

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> ChatPrompt:
        """The chat template applied; its content stays text when tokenized (chat_tokens.py)."""
        return render_chat(self, messages, tools=tools, add_generation_prompt=add_generation_prompt)

    @property
    def takes_images(self) -> bool:
        """Whether prompts may carry images (a vision projector is loaded)."""
        return False

    def media_tokens(self, prompt: MediaPrompt) -> MediaTokens:
        """A prompt with images -> token ids with the images' placeholders (engines with a projector)."""
        raise InvalidParameterError(f"{self.model_name} does not take images: it was loaded without a vision "
                                    "projector (serve a vision model with --mmproj FILE)", param="messages")

    def prompt_tokens(self, prompt: str | list[int] | ChatPrompt | MediaPrompt) -> list[int]:
        """A raw prompt's tokens (special tokens parsed: the caller owns the whole text), a chat's
        (only the template's markup is control tokens), a chat with images (placeholders), or token
        ids checked."""
        if isinstance(prompt, ChatPrompt):
            return chat_tokens(self, prompt)
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, MediaPrompt):
            return self.media_tokens(prompt)
        if isinstance(prompt, MediaTokens):
            return prompt  # made by media_tokens: placeholders stand for images
        tokens = list(prompt)
        self.check_token_ids(tokens)
        return tokens

    # -- generation -------------------------------------------------------------------------------

    def check_kind(self, *kinds: Kind, use: str) -> None:
        """Refuse a request for `use` (what it asks, in words) unless the model is of one of `kinds`."""
        if self.kind not in kinds:
            what = {"chat": "a chat model (it generates text)", "embedding": "an embedding model",
                    "rerank": "a reranker"}[self.kind]
            hint = {"chat": "send it chat or completion requests", "embedding": "use /v1/embeddings or /api/embed",
                    "rerank": "use /v1/rerank"}[self.kind]
            raise InvalidParameterError(f"{self.model_name} is {what}: it cannot be used for {use}; {hint}",
                                        param="model")

    def validate(self, tokens: list[int], params: SamplingParams) -> None:
        """Refuse, before any work, a request this engine cannot run as asked."""
        self.check_kind("chat", use="generating text")
        if not tokens:
            raise InvalidParameterError("the prompt is empty", param="prompt")
        self.check_prompt_length(len(tokens))
        if params.grammar and not self.grammars:
            raise InvalidParameterError(f"the {self.name} engine does not support grammars / JSON schemas; use "
                                        "the llama.cpp engine (or vLLM) for constrained output", param="grammar")
        rules.check_stop_token_ids(params, self.n_vocab)
        self.check_token_ids(list(params.logit_bias or ()), param="logit_bias")

    def stream(self, prompt: str | list[int] | ChatPrompt, params: SamplingParams) -> Iterator[Delta]:
        """Generate synchronously; closing the iterator cancels the request. Prompt errors are
        raised here, before the first delta."""
        tokens = self.prompt_tokens(prompt)
        params = params.with_defaults(self.sampling_defaults)
        self.validate(tokens, params)
        return self._stream(tokens, params)

    async def generate(self, prompt: str | list[int] | ChatPrompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Generate from asyncio; closing the iterator (client gone) cancels the request."""
        tokens = self.prompt_tokens(prompt)
        params = params.with_defaults(self.sampling_defaults)
        self.validate(tokens, params)
        async for delta in self._generate(tokens, params):
            yield delta

    @abstractmethod
    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]: ...

    @abstractmethod
    def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]: ...

    def finish_reason(self, token: int, params: SamplingParams, text: TextAssembler, n_prompt: int,
                      n_generated: int) -> FinishReason | None:
        """Whether the choice ends with `token` (its bytes already pushed to `text` unless it is an
        end-of-generation or stop token), for an engine that samples token by token in Python
        (rules.py: the llama.cpp scheduler calls the same rule)."""
        if rules.ends_text(token, params, self.eog_ids):
            return "stop"
        return rules.finish_after_text(params, text, n_generated, n_prompt + n_generated, self.n_ctx_seq)

    def ends_text(self, token: int, params: SamplingParams) -> bool:
        """The token is not text: an end-of-generation or stop token ends the choice unshown."""
        return rules.ends_text(token, params, self.eog_ids)

    def stats(self) -> EngineStats:
        """The engine's gauges and counters now (/metrics reads only these)."""
        return EngineStats(slots=self.n_parallel)

    # -- embeddings and lifecycle -----------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Pooled, L2-normalised embeddings, one per text (a chat model's are mean-pooled)."""
        raise InvalidParameterError(f"the {self.name} engine does not make embeddings; use the llama.cpp or "
                                    "transformers engine", param="model")

    async def embeddings(self, inputs: list[str | list[int]], *, normalize: int = 2) -> Embeddings:
        """Embeddings of texts or token ids, normalized as llama-server's `embd_normalize` says
        (2: euclidean); cancelling the awaiting task stops the work. This default runs `embed` in a
        worker thread (euclidean only)."""
        self.check_kind("chat", "embedding", use="embeddings")
        if normalize != 2:
            raise InvalidParameterError(f"the {self.name} engine normalizes embeddings to unit length only",
                                        param="embd_normalize")
        texts = [i if isinstance(i, str) else self.detokenize(i) for i in inputs]
        n_tokens = 0
        for i, text in enumerate(texts):
            count = len(self.tokenize(text))
            if count == 0:
                raise InvalidParameterError(f"input {i} is empty: no tokens to embed", param="input")
            n_tokens += count
        return Embeddings(await asyncio.to_thread(self.embed, texts), n_tokens)

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        """The relevance of each document to the query, as the model scores it (a reranker's)."""
        self.check_kind("rerank", use="reranking")
        raise InvalidParameterError(f"the {self.name} engine does not rerank; use the llama.cpp engine",
                                    param="model")

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_delta(choices: list[Delta], delta: Delta) -> None:
    """Fold one streamed delta into the per-choice totals."""
    choice = choices[delta.index]
    choice.text += delta.text
    choice.token_ids.extend(delta.token_ids)
    if delta.logprobs:
        choice.logprobs = (choice.logprobs or []) + delta.logprobs
    if delta.finish_reason:
        choice.finish_reason = delta.finish_reason
        choice.usage = delta.usage


def collect(deltas: Iterator[Delta], n: int = 1) -> list[Delta]:
    """One Delta per choice, with the whole text, from a stream (for non-streaming callers)."""
    choices = [Delta(index=i) for i in range(n)]
    for delta in deltas:
        merge_delta(choices, delta)
    return choices


async def collect_async(deltas: AsyncIterator[Delta], n: int = 1) -> list[Delta]:
    choices = [Delta(index=i) for i in range(n)]
    async for delta in deltas:
        merge_delta(choices, delta)
    return choices


# name -> "module:Class"; modules are imported only when their engine is asked for, so the heavy
# optional dependencies of one engine never load for another.
ENGINES: dict[str, tuple[str, str]] = {
    "llama.cpp": ("edge_llm.engines.llamacpp:LlamaCppEngine", ""),
    "transformers": ("edge_llm.engines.transformers:TransformersEngine", "hf"),
    "vllm": ("edge_llm.engines.vllm:VLLMEngine", "vllm"),
    "lmdeploy": ("edge_llm.engines.lmdeploy:LMDeployEngine", "lmdeploy"),
}


def engine_class(name: str) -> type:
    try:
        target, extra = ENGINES[name]
    except KeyError:
        raise EdgeLLMError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("edge_llm"):
            raise EdgeLLMError(f"engine {name!r} is not available in this version") from None
        raise MissingExtraError(exc.name or name, extra or name) from None
    return getattr(module, class_name)


def load_engine(model: str | None = None, *, engine: str = "llama.cpp", options: LoadOptions | None = None,
                config: str | None = None) -> Engine:
    """Resolve a model reference and load it in the named engine."""
    from edge_llm.registry import load_registry, resolve

    resolved = resolve(model, load_registry(config))
    # Each engine resolves the options against the registry entry (LoadOptions.resolve).
    loaded = engine_class(engine)(resolved, options or LoadOptions())
    loaded.sampling_defaults = resolved.spec.sampling_defaults()
    return loaded
