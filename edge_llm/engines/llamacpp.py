"""The default engine: llama.cpp through llama-cpp-python's low-level API.

The model, vocabulary and chat template live here; decoding (one context, many sequences,
continuous batching) lives in `scheduler.py`; llama.cpp's structs and loading calls in
`llama_runtime.py`.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edge_llm.chat_format import ChatFormatter, select_formatter
from edge_llm.chat_tokens import ChatPrompt, ControlToken, chat_tokens
from edge_llm.engines import llama_runtime as rt
from edge_llm.engines.base import CacheTierStats, Delta, Embeddings, Engine, EngineStats, Scores
from edge_llm.engines.cpu_threads import ThreadGovernor, default_threads
from edge_llm.engines.llama_log import set_verbose
from edge_llm.engines.llama_runtime import llama_cpp
from edge_llm.engines.media import MediaPrompt, MediaTokens
from edge_llm.engines.pooled import PooledWorker
from edge_llm.engines.projector import Projector, projector_path
from edge_llm.engines.speculation import Drafter, PromptLookup
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.load_options import LoadOptions
from edge_llm.model_kind import model_kind
from edge_llm.registry import ResolvedModel
from edge_llm.sampling import SamplingParams

if TYPE_CHECKING:
    from edge_llm.engines.prompt_cache import PromptCache
    from edge_llm.engines.scheduler import Scheduler

DEFAULT_N_CTX = 4096
# The longest input of an embedding model or reranker by default (-c raises it, up to the model's):
# an encoder attends over a whole input at once, and its compute buffer grows with the square.
DEFAULT_POOLED_CTX = 2048


def _file_identity(path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def draft_model_path(ref: str) -> Path:
    """The -md model's GGUF, found (never downloaded) and checked to be one."""
    from edge_llm.errors import ModelNotFoundError
    from edge_llm.registry import resolve

    try:
        draft = resolve(ref)
    except ModelNotFoundError as exc:
        raise InvalidParameterError(f"-md: {exc.message}", param="model_draft") from None
    if not draft.is_gguf:
        raise InvalidParameterError(f"-md {ref}: the draft model must be a GGUF (convert it with `edge-llm convert`)",
                                    param="model_draft")
    return Path(draft.path)


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    kv_unified: bool = False  # one KV pool any request may fill (-kvu)
    # Continuous batching and the prompt cache beyond the slots (chat models; None for the others).
    scheduler: Scheduler | None = None
    prompt_cache: PromptCache | None = None

    @classmethod
    def check_options(cls, options: LoadOptions) -> None:
        super().check_options(options)
        rt.kv_type(options.cache_type_k, "cache_type_k")
        rt.kv_type(options.cache_type_v, "cache_type_v")
        if options.cache_type_v not in ("f16", "f32", "bf16") and options.flash_attn == "off":
            raise InvalidParameterError("a quantized V cache (-ctv) needs flash attention: use -fa on or auto",
                                        param="cache_type_v")
        if options.cache_dir:
            from edge_llm.engines.prompt_cache import check_cache_dir

            check_cache_dir(options.cache_dir, options.cache_disk)
        if options.model_draft:
            draft_model_path(options.model_draft)

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = (options or LoadOptions()).resolve(model.spec)
        if not model.is_gguf:
            raise EdgeLLMError(f"{model.path} is an HF checkpoint; llama.cpp needs a GGUF: "
                               f"run `edge-llm convert {model.path}` first")
        self.check_options(options)
        rt.check_gguf_file(model.path)
        self.model_name = model.name
        self.path = model.path
        self.options = options
        set_verbose(options.verbose)
        self.model_kind = model_kind(self.path)
        self.kind = self.model_kind.kind
        self._model = rt.load_model(self.path, options)
        self.vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self.metadata = self._model.metadata()
        n_ctx_train = self._model.n_ctx_train()

        self._pooled: PooledWorker | None = None
        self.n_threads = options.n_threads or default_threads()
        self.bos_id = self._model.token_bos()
        self.eos_id = self._model.token_eos()
        self.add_bos = bool(self._model.add_bos_token()) and self.bos_id >= 0
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self._pieces: dict[int, bytes] = {}
        self.chat_template = self.metadata.get("tokenizer.chat_template")
        self.formatter: ChatFormatter = select_formatter(
            gguf_template=self.chat_template,
            chat_format=options.chat_format,
            bos_token=self.token_text(self.bos_id),
            eos_token=self.token_text(self.eos_id),
            in_prefix=options.in_prefix,
            in_suffix=options.in_suffix,
        )
        self.trust_content_markup = bool(options.trust_content_markup)
        self.projector: Projector | None = None
        if self.kind != "chat":
            self._load_pooled(options, n_ctx_train)
            return

        self.n_parallel = max(1, options.n_parallel)
        n_ctx = options.n_ctx or min(DEFAULT_N_CTX, n_ctx_train)
        if n_ctx < 16:
            raise InvalidParameterError(f"context size {n_ctx} is too small", param="n_ctx")
        fa = options.flash_attn
        # By default each sequence gets its own n_ctx / n_parallel cells: a request's attention
        # never runs over other requests' cells, so its output does not depend on what else is
        # running. -kvu: one pool of n_ctx cells that any sequence may fill (scheduler.py).
        params = rt.context_params(n_ctx=n_ctx, n_batch=min(options.n_batch, n_ctx), n_seq_max=self.n_parallel,
                                   n_threads=self.n_threads, n_threads_batch=options.n_threads_batch,
                                   flash_attn=fa, cache_type_k=options.cache_type_k,
                                   cache_type_v=options.cache_type_v, kv_unified=bool(options.kv_unified),
                                   swa_full=bool(options.swa_full))
        if options.n_gpu_layers == 0:  # on the GPU, llama.cpp's own allocation is the check
            rt.check_context_fits(self._model, n_ctx, options.cache_type_k, options.cache_type_v)
        # The scheduler's context: only its engine thread decodes on it (a llama_context is not thread-safe).
        self.context = rt.new_context(self._model, params, verbose=options.verbose, what=f"a context for {self.path}")
        self.n_ctx = rt.n_ctx_of(self.context)
        self.kv_unified = bool(options.kv_unified)
        self.n_batch = params.n_batch
        window = rt.sliding_window(self._model)
        self.n_layer = int(llama_cpp.llama_model_n_layer(self._model.model))
        self.flash_attn = fa
        self.n_gpu_layers = options.n_gpu_layers
        self.seed = options.seed
        self._pooled_lock = threading.Lock()
        self.scheduler = None
        self.prompt_cache = None

        from edge_llm.engines.prompt_cache import open_prompt_cache
        from edge_llm.engines.scheduler import ModelView, Scheduler, SchedulerConfig

        try:
            mmproj = projector_path(options.mmproj, self.path)
            if mmproj is not None:
                self.projector = Projector(mmproj, self._model, n_threads=self.n_threads,
                                           use_gpu=options.n_gpu_layers != 0, verbose=options.verbose)
            self.prompt_cache = open_prompt_cache(
                self.path, {"n_ctx": self.n_ctx, "n_parallel": self.n_parallel, "kv_unified": self.kv_unified,
                            "cache_type_k": options.cache_type_k, "cache_type_v": options.cache_type_v,
                            "flash_attn": fa, "llama_cpp": llama_cpp.__version__,
                            # a window layer's state holds the window or every position
                            **({"swa_full": bool(options.swa_full)} if window else {}),
                            # image embeddings in a saved state come from this projector
                            **({"mmproj": _file_identity(mmproj)} if mmproj is not None else {})},
                ram_budget=options.cache_ram, cache_dir=options.cache_dir, disk_budget=options.cache_disk,
                prefix_reuse=not window)
            drafter = self._drafter(options)
        except BaseException:
            self.close()
            raise
        model = ModelView(self.context, self.vocab, self.n_vocab, self.eog_ids, self.token_piece, self.token_text)
        config = SchedulerConfig(n_ctx=self.n_ctx, n_ctx_seq=self.n_ctx_seq, n_parallel=self.n_parallel,
                                 n_batch=self.n_batch, kv_unified=self.kv_unified, seed=self.seed,
                                 max_waiting=options.max_queue, n_threads=self.n_threads,
                                 n_threads_batch=options.n_threads_batch, images=self.projector is not None,
                                 draft_max=options.draft_max, draft_min=options.draft_min)
        # -t or every core: at most that many (exactly that many with --no-adapt-threads)
        governor = ThreadGovernor(self.n_threads, adapt=options.adapt_threads)
        self.scheduler = Scheduler(model, config, governor=governor, cache=self.prompt_cache, drafter=drafter)

    def _drafter(self, options: LoadOptions) -> Drafter | None:
        """Speculative decoding's drafter (--spec, -md): prompt lookup by default, none for models
        whose memory cannot drop rejected drafts (recurrent and hybrid models)."""
        spec = options.spec or ("draft" if options.model_draft else "ngram")
        if spec == "off":
            return None
        if spec == "draft" and not options.model_draft:
            raise InvalidParameterError("--spec draft needs a draft model: -md MODEL", param="model_draft")
        if llama_cpp.llama_model_is_recurrent(self._model.model) or llama_cpp.llama_model_is_hybrid(self._model.model):
            if options.spec is not None:
                raise InvalidParameterError(f"--spec {spec}: {self.path.name} is a recurrent model, whose state "
                                            "cannot drop rejected drafts; use --spec off", param="spec")
            return None
        if spec == "ngram":
            return PromptLookup()
        from edge_llm.engines.draft_model import DraftModel

        # With -kvu a slot may hold the whole context; the draft keeps a slot's share and drafts
        # nothing past it.
        return DraftModel(draft_model_path(options.model_draft), self, n_parallel=self.n_parallel, n_ctx_seq=self.n_ctx // self.n_parallel,
                          n_threads=self.n_threads, verbose=options.verbose)

    @property
    def takes_images(self) -> bool:
        return self.projector is not None

    def media_tokens(self, prompt: MediaPrompt) -> MediaTokens:
        if self.projector is None:
            return super().media_tokens(prompt)
        tokens = self.projector.tokenize(prompt, self._range_tokenizer(prompt.prompt))
        for span in tokens.images:
            # Rows that attend to each other both ways (Gemma 3) must be decoded in one batch.
            if span.chunk.non_causal and span.n_tokens > self.n_batch:
                tokens.release()
                raise InvalidParameterError(f"this model's images take {span.n_tokens} tokens, more than the batch "
                                            f"of {self.n_batch}: raise -b to at least {span.n_tokens}",
                                            param="messages")
        return tokens

    def _range_tokenizer(self, prompt: str | ChatPrompt):
        """(start, end) -> the tokens of that stretch of a rendered prompt, by the prompt's own rule:
        a chat's content as text (chat_tokens.py), raw text with special tokens parsed."""
        if isinstance(prompt, str):
            return lambda a, b: self.tokenize(prompt[a:b]) if a == 0 else self.tokenize(prompt[a:b], add_bos=False)

        def tokens(a: int, b: int) -> list[int]:
            # The text between images never cuts the template's markup: its control tokens end by `b`.
            markup = None if prompt.markup is None else tuple(m for m in prompt.markup if m[1] <= b)
            return chat_tokens(self, ChatPrompt(prompt.text[:b], markup), start=a)
        return tokens

    @property
    def n_ctx_seq(self) -> int:
        """One request's share of the context: all of it with one KV pool (-kvu), else its slot's."""
        return self.n_ctx if self.kv_unified else self.n_ctx // self.n_parallel

    def stats(self) -> EngineStats:
        ram = disk = None
        cache = self.prompt_cache
        if cache is not None:
            ram = CacheTierStats(cache.ram_bytes, cache.ram_budget, cache.stats.evictions)
            if cache.disk is not None:
                disk = CacheTierStats(cache.disk_bytes, cache.disk.budget, cache.stats.disk_evictions)
        scheduler = self.scheduler
        if scheduler is None:
            return EngineStats(slots=self.n_parallel, cache_ram=ram, cache_disk=disk)
        return EngineStats(slots=self.n_parallel, running=scheduler.running, waiting=scheduler.waiting,
                           kv_usage=scheduler.kv_usage, threads=scheduler.threads,
                           decodes_with_fewer_threads=scheduler.stats.decodes_with_fewer_threads,
                           cache_ram=ram, cache_disk=disk)

    # -- vocabulary -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Text to token ids. BOS is added when the model wants it, unless the text already
        starts with it (chat templates often write it themselves)."""
        data = text.encode("utf-8", errors="replace")
        if add_bos is None:
            bos_text = self.token_text(self.bos_id)
            add_bos = self.add_bos and not (special and bos_text and text.startswith(bos_text))
        if not data:
            return [self.bos_id] if add_bos else []
        return self._model.tokenize(data, add_bos, special)

    def control_token_list(self) -> list[ControlToken]:
        return [ControlToken(text.decode("utf-8", errors="replace"), lstrip, rstrip)
                for text, lstrip, rstrip in rt.control_tokens(self.vocab)]

    def token_piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = rt.token_to_piece(self.vocab, token, special=False)
            self._pieces[token] = piece
        return piece

    def token_text(self, token: int) -> str:
        if token < 0 or token >= self.n_vocab:
            return ""
        return rt.token_to_piece(self.vocab, token, special=True).decode("utf-8", errors="replace")

    # -- generation -----------------------------------------------------------------------------

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        return self.scheduler.stream(tokens, params)

    async def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        request = self.scheduler.submit(tokens, params)
        try:
            while True:
                delta = await request.aget()
                if delta is None:
                    return
                yield delta
        finally:
            request.cancel()

    # -- embeddings and rerank ------------------------------------------------------------------

    def _load_pooled(self, options: LoadOptions, n_ctx_train: int) -> None:
        """An embedding model or a reranker: no generation context, only the pooled one, whose
        context is the longest input it takes."""
        self.n_parallel = 1
        # Never past the trained length: an encoder's position embeddings end there.
        self.n_ctx = min(options.n_ctx or DEFAULT_POOLED_CTX, n_ctx_train)
        if self.n_ctx < 16:
            raise InvalidParameterError(f"context size {self.n_ctx} is too small", param="n_ctx")
        self.n_batch = options.n_batch
        self.n_layer = int(llama_cpp.llama_model_n_layer(self._model.model))
        self.flash_attn = options.flash_attn
        self.n_gpu_layers = options.n_gpu_layers
        self.seed = options.seed
        self.context = None
        self.kv_unified = False
        self._pooled_lock = threading.Lock()
        try:
            self._pooled_worker()
        except BaseException:
            self.close()
            raise

    def _pooled_worker(self) -> PooledWorker:
        """The pooled context and its thread, made on first use for a chat model (mean pooling,
        inputs up to 2048 tokens or its slot's size), at load for the others."""
        with self._pooled_lock:
            if self._pooled is None:
                n_ctx = self.n_ctx if self.kind != "chat" else min(self.n_ctx_seq, DEFAULT_POOLED_CTX)
                self._pooled = PooledWorker(self._model, pooling=self.model_kind.pooling_id, n_ctx=n_ctx,
                                            n_batch=self.options.n_batch, n_threads=self.n_threads,
                                            adapt_threads=self.options.adapt_threads,
                                            verbose=self.options.verbose,
                                            what=f"a {self.model_kind.pooling}-pooled context for {self.path}")
            return self._pooled

    def input_tokens(self, text: str) -> list[int]:
        """An embedding input as llama-server tokenizes it: the vocabulary's own BOS / EOS / SEP added
        around it; the text itself is text (no special tokens parsed out of it)."""
        data = text.encode("utf-8", errors="replace")
        return self._model.tokenize(data, True, False) if data else []

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        """A query-document pair as llama-server's format_prompt_rerank lays it out: the model's
        "rerank" template (Qwen3-Reranker's) with both filled in, else [BOS] query [EOS] [SEP]
        document [EOS] as the vocabulary adds them. Only the template's markup becomes special tokens."""
        template = llama_cpp.llama_model_chat_template(self._model.model, b"rerank")
        if template:
            return self._template_tokens(template.decode("utf-8", errors="replace"), {"query": query,
                                                                                     "document": document})
        vocab = self.vocab
        eos = llama_cpp.llama_vocab_eos(vocab)
        if eos < 0:
            eos = llama_cpp.llama_vocab_sep(vocab)
        add_eos, add_sep = llama_cpp.llama_vocab_get_add_eos(vocab), llama_cpp.llama_vocab_get_add_sep(vocab)
        tokens = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        tokens += self.tokenize(query, special=False, add_bos=False)
        tokens += [eos] if add_eos else []
        tokens += [llama_cpp.llama_vocab_sep(vocab)] if add_sep else []
        tokens += self.tokenize(document, special=False, add_bos=False)
        tokens += [eos] if add_eos else []
        return tokens

    def _template_tokens(self, template: str, values: dict[str, str]) -> list[int]:
        """`template` with {name} placeholders filled, tokenized as llama.cpp tokenizes the whole text
        with special tokens parsed (it cuts the text at each special token and tokenizes the runs
        between them alone), except that special tokens are looked for in the template's own text
        only: a query that spells "<|im_end|>" stays text."""
        pieces = re.split(r"(\{(?:" + "|".join(values) + r")\})", template)
        text, controls = "", []  # controls: (start, end, token id) in `text`
        for piece in pieces:
            name = piece[1:-1] if piece.startswith("{") and piece[1:-1] in values else None
            if name is not None:
                text += values[name]
                continue
            at = 0
            for token in self._model.tokenize(piece.encode(), False, True):
                if llama_cpp.llama_vocab_get_attr(self.vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
                    mark = self.token_text(token)
                    start = piece.find(mark, at)
                    if start >= 0:
                        controls.append((len(text) + start, len(text) + start + len(mark), token))
                        at = start + len(mark)
            text += piece
        tokens, at = [], 0
        for start, end, token in controls:
            if start > at:
                tokens += self.tokenize(text[at:start], special=False, add_bos=False)
            tokens.append(token)
            at = end
        if at < len(text):
            tokens += self.tokenize(text[at:], special=False, add_bos=False)
        return tokens

    def _pooled_request(self, sequences: list[list[int]], normalize: int, loop=None):  # noqa: ANN001, ANN202
        from edge_llm.engines.threadbridge import Channel

        channel: Channel = Channel()
        if loop is not None:
            channel.bind(loop)
        return self._pooled_worker().submit(sequences, normalize=normalize, channel=channel)

    def _sequences(self, inputs: list[str | list[int]]) -> list[list[int]]:
        sequences = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                sequences.append(self.input_tokens(item))
            else:
                self.check_token_ids(list(item), param="input")
                sequences.append(list(item))
            if not sequences[-1]:
                # llama.cpp's embedding decode of zero tokens corrupts memory and aborts the process.
                raise InvalidParameterError(f"input {i} is empty: no tokens to embed", param="input")
        return sequences

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Pooled, L2-normalised embeddings of the texts (blocking; Ctrl-C stops the work)."""
        self.check_kind("chat", "embedding", use="embeddings")
        request = self._pooled_request(self._sequences(list(texts)), 2)
        out: list = [None] * len(texts)
        try:
            while (item := request.channel.get()) is not None:
                out[item[0]] = item[1].tolist()
        finally:
            request.channel.cancel()
        return out

    async def embeddings(self, inputs: list[str | list[int]], *, normalize: int = 2) -> Embeddings:
        self.check_kind("chat", "embedding", use="embeddings")
        sequences = await asyncio.to_thread(self._sequences, inputs)
        vectors = await self._collect(sequences, normalize)
        return Embeddings([v.tolist() for v in vectors], sum(map(len, sequences)))

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        self.check_kind("rerank", use="reranking")
        sequences = await asyncio.to_thread(lambda: [self.rerank_tokens(query, d) for d in documents])
        outputs = await self._collect(sequences, -1)
        return Scores([float(o[0]) for o in outputs], sum(map(len, sequences)))

    async def _collect(self, sequences: list[list[int]], normalize: int) -> list:
        request = self._pooled_request(sequences, normalize, asyncio.get_running_loop())
        out: list = [None] * len(sequences)
        try:
            while (item := await request.channel.aget()) is not None:
                out[item[0]] = item[1]
        finally:
            request.channel.cancel()  # a caller that left (or failed) stops the rest of the work
        return out

    def new_context(self, params: llama_cpp.llama_context_params, *, what: str) -> rt.LlamaContext:
        """A further context on this engine's weights (embeddings, perplexity); close it before the engine."""
        return rt.new_context(self._model, params, verbose=self.options.verbose, what=what)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
        if getattr(self, "prompt_cache", None) is not None:
            self.prompt_cache.close()  # after the scheduler has handed it the slots' states
        if getattr(self, "formatter", None) is not None:
            self.formatter.close()  # the chat template's sandbox process
        if getattr(self, "_pooled", None) is not None:
            self._pooled.close()
            self._pooled = None
        if getattr(self, "projector", None) is not None:
            self.projector.close()  # after the scheduler's vision worker has stopped
        if getattr(self, "context", None) is not None:
            self.context.close()
        if getattr(self, "_model", None) is not None:
            self._model.close()

