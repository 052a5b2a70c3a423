"""The default engine: llama.cpp through llama-cpp-python's low-level API.

The model, vocabulary and chat template live here; decoding (one context, many sequences,
continuous batching) lives in `scheduler.py`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from edge_llm.engines.cpu_threads import configure_openmp, default_threads

# Before llama_cpp loads libgomp, which reads its environment once (see cpu_threads).
configure_openmp()

import llama_cpp  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from llama_cpp import _internals  # noqa: E402

from edge_llm.chat_format import ChatFormatter, select_formatter  # noqa: E402
from edge_llm.engines.base import Delta, Engine, LoadOptions  # noqa: E402
from edge_llm.engines.llama_log import set_verbose  # noqa: E402
from edge_llm.errors import ContextLengthError, EdgeLLMError, InvalidParameterError, ModelLoadError  # noqa: E402
from edge_llm.registry import ResolvedModel  # noqa: E402
from edge_llm.sampling import SamplingParams  # noqa: E402

# ggml's type ids, from the official gguf package (llama_cpp does not export all of them).
KV_CACHE_TYPES = {
    name: int(getattr(GGMLQuantizationType, name.upper()))
    for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
}
FLASH_ATTN = {
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
}
SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
DEFAULT_N_CTX = 4096
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def check_gguf_file(path: Path) -> None:
    """One clear line for the usual mistakes before llama.cpp sees the file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r}); "
                             "convert HF checkpoints with `edge-llm convert`")


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = (options or LoadOptions()).resolve(model.spec)
        if not model.is_gguf:
            raise EdgeLLMError(f"{model.path} is an HF checkpoint; llama.cpp needs a GGUF: "
                               f"run `edge-llm convert {model.path}` first")
        check_gguf_file(model.path)
        self.model_name = model.name
        self.path = model.path
        self.options = options
        set_verbose(options.verbose)
        _init_backend()

        model_params = llama_cpp.llama_model_default_params()
        ngl = options.n_gpu_layers
        model_params.n_gpu_layers = 0x7FFFFFFF if ngl < 0 else ngl
        model_params.split_mode = SPLIT_MODES[options.split_mode]
        model_params.main_gpu = options.main_gpu
        if options.tensor_split:
            # llama.cpp reads the array during the load: keep it alive as long as the engine.
            self._tensor_split = _tensor_split_array(options.tensor_split)
            model_params.tensor_split = self._tensor_split
        model_params.use_mlock = options.use_mlock
        if hasattr(model_params, "load_mode"):
            model_params.load_mode = _load_mode(options.use_mmap, options.use_mlock)
        try:
            self._model = _internals.LlamaModel(path_model=str(self.path), params=model_params,
                                                verbose=options.verbose)
        except ValueError:
            raise ModelLoadError(f"llama.cpp could not load {self.path}: the file is truncated, corrupt "
                                 "or of an unsupported architecture (run with -v for llama.cpp's log)") from None
        self.vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self.metadata = self._model.metadata()
        self.n_ctx_train = self._model.n_ctx_train()

        self.n_parallel = max(1, options.n_parallel)
        n_ctx = options.n_ctx or min(DEFAULT_N_CTX, self.n_ctx_train)
        if n_ctx < 16:
            raise InvalidParameterError(f"context size {n_ctx} is too small", param="n_ctx")
        self.n_threads = options.n_threads or default_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = min(options.n_batch, n_ctx)
        ctx_params.n_ubatch = min(options.n_batch, n_ctx)
        ctx_params.n_seq_max = self.n_parallel
        # By default each sequence gets its own n_ctx / n_parallel cells: a request's attention
        # never runs over other requests' cells, so its output does not depend on what else is
        # running. -kvu: one pool of n_ctx cells that any sequence may fill (scheduler.py).
        ctx_params.kv_unified = bool(options.kv_unified)
        ctx_params.n_threads = self.n_threads
        ctx_params.n_threads_batch = options.n_threads_batch or self.n_threads
        fa = options.flash_attn
        ctx_params.flash_attn_type = FLASH_ATTN[fa]
        ctx_params.type_k = _kv_type(options.cache_type_k, "cache_type_k")
        ctx_params.type_v = _kv_type(options.cache_type_v, "cache_type_v")
        if options.cache_type_v not in ("f16", "f32", "bf16") and fa == "off":
            raise InvalidParameterError("a quantized V cache (-ctv) needs flash attention: use -fa on or auto",
                                        param="cache_type_v")
        ctx_params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=ctx_params, verbose=options.verbose)
        except ValueError:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path} "
                                 "(out of memory, or an unsupported cache type / flash-attention setting)") from None
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx.ctx)
        self.kv_unified = bool(options.kv_unified)
        self.n_batch = ctx_params.n_batch
        self.flash_attn = fa
        self.n_gpu_layers = ngl
        self.seed = options.seed

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
        self._embed_ctx: _internals.LlamaContext | None = None
        self._embed_lock = threading.Lock()

        from edge_llm.engines.prompt_cache import open_prompt_cache
        from edge_llm.engines.scheduler import Scheduler

        try:
            self.prompt_cache = open_prompt_cache(
                self.path, {"n_ctx": self.n_ctx, "n_parallel": self.n_parallel, "kv_unified": self.kv_unified,
                            "cache_type_k": options.cache_type_k, "cache_type_v": options.cache_type_v,
                            "flash_attn": fa, "llama_cpp": llama_cpp.__version__},
                ram_budget=options.cache_ram, cache_dir=options.cache_dir, disk_budget=options.cache_disk)
        except BaseException:
            self.close()
            raise
        self.scheduler = Scheduler(self, max_waiting=options.max_queue, cache=self.prompt_cache)

    @property
    def n_ctx_seq(self) -> int:
        """One request's share of the context: all of it with one KV pool (-kvu), else its slot's."""
        return self.n_ctx if self.kv_unified else self.n_ctx // self.n_parallel

    # -- vocabulary -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Text to token ids. BOS is added when the model wants it, unless the text already
        starts with it (chat templates often write it themselves)."""
        data = text.encode("utf-8", errors="replace")
        if add_bos is None:
            add_bos = self.add_bos and not (special and text.startswith(self.token_text(self.bos_id)))
        if not data:
            return [self.bos_id] if add_bos else []
        return self._model.tokenize(data, add_bos, special)

    def token_piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = _token_to_piece(self.vocab, token, special=False)
            self._pieces[token] = piece
        return piece

    def token_text(self, token: int) -> str:
        if token < 0 or token >= self.n_vocab:
            return ""
        return _token_to_piece(self.vocab, token, special=True).decode("utf-8", errors="replace")

    # -- generation -----------------------------------------------------------------------------

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        return self.scheduler.stream(tokens, params)

    async def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        request = self.scheduler.submit(tokens, params)
        try:
            while True:
                delta = await request.next_async()
                if delta is None:
                    return
                yield delta
        finally:
            request.cancel()

    # -- embeddings -----------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings, from a second context that shares the weights."""
        import numpy as np

        n_embd = self._model.n_embd()
        out = []
        with self._embed_lock:
            ctx = self._embedding_context()
            limit = llama_cpp.llama_n_ctx(ctx.ctx)
            batch = _internals.LlamaBatch(n_tokens=limit, embd=0, n_seq_max=1)
            try:
                for text in texts:
                    tokens = self.tokenize(text)
                    if not tokens:  # llama_decode aborts the process on an empty batch
                        raise InvalidParameterError("cannot embed an empty input", param="input")
                    if len(tokens) > limit:
                        raise ContextLengthError(f"input of {len(tokens)} tokens exceeds the embedding context "
                                                 f"of {limit}", param="input")
                    ctx.kv_cache_clear()
                    batch.reset()
                    batch.add_sequence(tokens, 0, logits_all=True)
                    ctx.decode(batch)
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)
                    vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()
                    norm = float(np.linalg.norm(vec)) or 1.0
                    out.append((vec / norm).tolist())
            finally:
                batch.close()
        return out

    def _embedding_context(self) -> _internals.LlamaContext:
        if self._embed_ctx is None:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = min(self.n_ctx_seq, 2048)
            params.n_batch = params.n_ubatch = params.n_ctx
            params.n_seq_max = 1
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            params.n_threads = params.n_threads_batch = self.n_threads
            params.no_perf = True
            self._embed_ctx = _internals.LlamaContext(model=self._model, params=params, verbose=self.options.verbose)
        return self._embed_ctx

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.prompt_cache is not None:
            self.prompt_cache.close()  # after the scheduler has handed it the slots' states
        if getattr(self, "formatter", None) is not None:
            self.formatter.close()  # the chat template's sandbox process
        if getattr(self, "_embed_ctx", None) is not None:
            self._embed_ctx.close()
            self._embed_ctx = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
        if getattr(self, "_model", None) is not None:
            self._model.close()


def _token_to_piece(vocab: llama_cpp.llama_vocab_p, token: int, special: bool) -> bytes:
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    if n < 0:  # the piece is longer than the buffer: -n is the size it needs
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[:n]


def _kv_type(name: str, param: str) -> int:
    try:
        return KV_CACHE_TYPES[name.lower()]
    except KeyError:
        raise InvalidParameterError(f"invalid {param}: {name!r}; choose from {', '.join(KV_CACHE_TYPES)}",
                                    param=param) from None


def _tensor_split_array(shares: tuple[float, ...]) -> ctypes.Array:
    """--tensor-split 3,1 -> the float[LLAMA_MAX_DEVICES] llama_model_params points to."""
    limit = llama_cpp.llama_max_devices()
    if len(shares) > limit or any(s < 0 for s in shares) or not any(shares):
        raise InvalidParameterError(f"--tensor-split takes at most {limit} non-negative shares, not all zero "
                                    f"(got {','.join(map(str, shares))})", param="tensor_split")
    return (ctypes.c_float * limit)(*shares)


def _load_mode(use_mmap: bool, use_mlock: bool) -> int:
    if use_mmap and use_mlock:
        return llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK
    if use_mlock:
        return llama_cpp.LLAMA_LOAD_MODE_MLOCK
    if use_mmap:
        return llama_cpp.LLAMA_LOAD_MODE_MMAP
    return llama_cpp.LLAMA_LOAD_MODE_NONE
