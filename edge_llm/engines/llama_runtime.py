"""llama.cpp through llama-cpp-python's low-level API: the one place that builds its parameter
structs and calls its loading functions, for the engine, perplexity, quantize and offload.

A llama-cpp-python upgrade that moves these signatures is fixed here. Importing this module sets
OpenMP's waiting policy first (cpu_threads.configure_openmp): libgomp reads its environment once,
when llama_cpp loads it.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_llm.engines.cpu_threads import configure_openmp

configure_openmp()

import llama_cpp  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel, LlamaSampler  # noqa: E402

from edge_llm.errors import InvalidParameterError, ModelLoadError  # noqa: E402

if TYPE_CHECKING:
    from edge_llm.load_options import LoadOptions

__all__ = ["LlamaBatch", "LlamaContext", "LlamaModel", "LlamaSampler", "llama_cpp"]

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
_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """llama_backend_init once per process (it also loads the dynamic GPU backends)."""
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


# -- the model ------------------------------------------------------------------------------------


def load_model(path: Path, options: LoadOptions) -> LlamaModel:
    """The weights, placed as the resolved options say (-ngl, --split-mode, --tensor-split,
    --mlock, --no-mmap)."""
    init_backend()
    params = llama_cpp.llama_model_default_params()
    ngl = options.n_gpu_layers
    params.n_gpu_layers = 0x7FFFFFFF if ngl < 0 else ngl
    params.split_mode = SPLIT_MODES[options.split_mode]
    params.main_gpu = options.main_gpu
    if options.tensor_split:
        # llama.cpp reads the array during the load; `params` holds it alive until then.
        params.tensor_split = tensor_split_array(options.tensor_split)
    params.use_mlock = options.use_mlock
    if hasattr(params, "load_mode"):
        params.load_mode = _load_mode(options.use_mmap, options.use_mlock)
    try:
        return LlamaModel(path_model=str(path), params=params, verbose=options.verbose)
    except ValueError:
        raise ModelLoadError(f"llama.cpp could not load {path}: the file is truncated, corrupt "
                             "or of an unsupported architecture (run with -v for llama.cpp's log)") from None


def tensor_split_array(shares: tuple[float, ...]) -> ctypes.Array:
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


def token_to_piece(vocab: llama_cpp.llama_vocab_p, token: int, special: bool) -> bytes:
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    if n < 0:  # the piece is longer than the buffer: -n is the size it needs
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[:n]


# -- contexts -------------------------------------------------------------------------------------


def kv_type(name: str, param: str) -> int:
    try:
        return KV_CACHE_TYPES[name.lower()]
    except KeyError:
        raise InvalidParameterError(f"invalid {param}: {name!r}; choose from {', '.join(KV_CACHE_TYPES)}",
                                    param=param) from None


def context_params(*, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int, n_threads_batch: int | None = None,
                   n_ubatch: int | None = None, flash_attn: str = "auto", cache_type_k: str = "f16",
                   cache_type_v: str = "f16", kv_unified: bool = False,
                   embeddings: bool = False) -> llama_cpp.llama_context_params:
    """llama_context_params with edge-llm's names; embeddings: mean-pooled sequence embeddings."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch if n_ubatch is None else n_ubatch
    params.n_seq_max = n_seq_max
    params.kv_unified = kv_unified
    params.n_threads = n_threads
    params.n_threads_batch = n_threads_batch or n_threads
    params.flash_attn_type = FLASH_ATTN[flash_attn]
    params.type_k = kv_type(cache_type_k, "cache_type_k")
    params.type_v = kv_type(cache_type_v, "cache_type_v")
    if embeddings:
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    params.no_perf = True
    return params


def new_context(model: LlamaModel, params: llama_cpp.llama_context_params, *, verbose: bool,
                what: str) -> LlamaContext:
    """A context on loaded weights; a failure is one ModelLoadError line naming `what`."""
    try:
        return LlamaContext(model=model, params=params, verbose=verbose)
    except ValueError:
        raise ModelLoadError(f"llama.cpp could not create {what} of {params.n_ctx} tokens (out of memory, or an "
                             "unsupported cache type / flash-attention setting)") from None


def n_ctx_of(ctx: LlamaContext) -> int:
    return int(llama_cpp.llama_n_ctx(ctx.ctx))


def clear_memory(ctx: LlamaContext) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)


# -- batches --------------------------------------------------------------------------------------


def add_tokens(batch: LlamaBatch, tokens: list[int], *, pos: int, seq_id: int,
               logits: Callable[[int], bool]) -> int:
    """Append one sequence's tokens at positions pos.. to the batch; `logits(i)`: whether the
    i-th of them wants its logits. The batch index of the last one."""
    b = batch.batch
    for i, token in enumerate(tokens):
        j = b.n_tokens + i
        b.token[j] = token
        b.pos[j] = pos + i
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = seq_id
        b.logits[j] = logits(i)
    b.n_tokens += len(tokens)
    return b.n_tokens - 1
