"""llama.cpp through llama-cpp-python's low-level API: the one place that builds its parameter
structs and calls its loading functions, for the engine, perplexity, quantize and offload, and
that holds the decoding calls of the scheduler (batches, decode, logits, sampler chains, KV
memory by sequence and its saved states).

A llama-cpp-python upgrade that moves these signatures is fixed here. Importing this module sets
OpenMP's waiting policy first (cpu_threads.configure_openmp): libgomp reads its environment once,
when llama_cpp loads it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_llm.engines.cpu_threads import configure_openmp

configure_openmp()

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel, LlamaSampler  # noqa: E402

from edge_llm.errors import InvalidParameterError, ModelLoadError  # noqa: E402

if TYPE_CHECKING:
    from edge_llm.engines.top_k import TopKFirst
    from edge_llm.load_options import LoadOptions
    from edge_llm.sampling import SamplingParams

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
log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """llama_backend_init once per process (it also loads the dynamic GPU backends), with the
    AMX weight buffers left out (`leave_out_amx`)."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            leave_out_amx()
            _backend_ready = True


def leave_out_amx() -> bool:
    """Keep weights out of ggml's AMX buffers; True if AMX was there to leave out.

    On a CPU with AMX (Intel Sapphire Rapids and later) a ggml built there with -march=native puts
    the weights of AMX-capable quants (q4_0, q4_1, q8_0, q4_K ...) in AMX buffers, and this
    llama.cpp's AMX matmul segfaults on the first decode (llama.cpp issue #20824, the fix proposed
    in PR #26954; seen on the 2-core Sapphire Rapids VMs this project is tested on, with the bundled
    model). Ollama leaves AMX out of its builds for Sapphire Rapids on speed grounds alone (ollama PR
    #9203). The CPU's list of extra weight buffer types (AMX, CPU_REPACK) is the null-terminated
    array llama.cpp reads at every model load (`ggml_backend_dev_get_extra_bufts`); AMX is taken
    out of it, so the other repacked layouts (CPU_REPACK's q4_0 / q4_K / iq4_nl) are still used,
    as llama-server's default uses them. llama-server's own switch, --no-repack, would drop those too."""
    try:
        base = Path(llama_cpp.llama_cpp._base_path)
        ggml = ctypes.CDLL(str(base / "libggml.so"))
        ggml_base = ctypes.CDLL(str(base / "libggml-base.so"))
    except (AttributeError, OSError):
        return False  # another layout (Windows, macOS, a system llama.cpp): no AMX there to guard
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    ggml.ggml_backend_dev_backend_reg.restype, ggml.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    ggml.ggml_backend_reg_get_proc_address.restype = vp
    ggml.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    ggml_base.ggml_backend_buft_name.restype, ggml_base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    cpu = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu:
        return False
    address = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(cpu),
                                                     b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return False
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(address)(cpu)
    kept, i, dropped = [], 0, False
    while bufts and bufts[i]:
        if ggml_base.ggml_backend_buft_name(bufts[i]) == b"AMX":
            dropped = True
        else:
            kept.append(bufts[i])
        i += 1
    if dropped:
        for j in range(i):  # compacted in place, still null-terminated
            bufts[j] = kept[j] if j < len(kept) else None
        log.debug("AMX weight buffers left out (llama.cpp issue #20824)")
    return dropped


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
    --mlock, --no-mmap, --repack)."""
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
    # llama.cpp's CPU_REPACK layouts (use_extra_bufts; llama-server's --no-repack turns them off).
    # On x86 the repacked q4_K matmul rounds rows of a batch differently from a lone row (its GEMM
    # takes rows four at a time, a GEMV the rest), so with it a token's logits depend on how many
    # rows share its decode: speculation's verification and other slots can flip a near tie.
    params.use_extra_bufts = options.repack
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


VOCAB_TYPES = {value: name.removeprefix("LLAMA_VOCAB_TYPE_") for name, value in vars(llama_cpp).items()
               if name.startswith("LLAMA_VOCAB_TYPE_")}


def vocab_specials(vocab: llama_cpp.llama_vocab_p) -> dict[str, str | int | bool]:
    """The vocabulary's type (SPM, BPE ...) and its BOS / EOS (whether added, which id): what a
    draft model must share with its target (llama.cpp's common_speculative_are_compatible)."""
    kind = int(llama_cpp.llama_vocab_type(vocab))
    return {"type": VOCAB_TYPES.get(kind, str(kind)),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)), "bos": int(llama_cpp.llama_vocab_bos(vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)), "eos": int(llama_cpp.llama_vocab_eos(vocab))}


def vocab_texts(vocab: llama_cpp.llama_vocab_p) -> list[bytes]:
    """Every token's text as the vocabulary stores it (not the decoded piece)."""
    return [llama_cpp.llama_vocab_get_text(vocab, t) or b"" for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]


def control_tokens(vocab: llama_cpp.llama_vocab_p) -> list[tuple[bytes, bool, bool]]:
    """(text, lstrip, rstrip) of the tokens that llama_tokenize cuts out of a text only with
    parse_special: control and unknown tokens (tokenizer_st_partition skips them otherwise)."""
    out = []
    parsed_only = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    for t in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = int(llama_cpp.llama_vocab_get_attr(vocab, t))
        if attr & parsed_only:
            out.append((llama_cpp.llama_vocab_get_text(vocab, t) or b"", bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                        bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)))
    return out


# -- contexts -------------------------------------------------------------------------------------


def kv_type(name: str, param: str) -> int:
    try:
        return KV_CACHE_TYPES[name.lower()]
    except KeyError:
        raise InvalidParameterError(f"invalid {param}: {name!r}; choose from {', '.join(KV_CACHE_TYPES)}",
                                    param=param) from None


def context_params(*, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int, n_threads_batch: int | None = None,
                   n_ubatch: int | None = None, flash_attn: str = "auto", cache_type_k: str = "f16",
                   cache_type_v: str = "f16", kv_unified: bool = False, swa_full: bool = False,
                   pooling: int | None = None) -> llama_cpp.llama_context_params:
    """llama_context_params with edge-llm's names; `pooling` (a llama_pooling_type): a context of
    pooled sequence outputs (embeddings, rerank scores) instead of logits. `swa_full`: sliding-window
    layers (Gemma 2/3, ...) keep every position, as full-attention ones do; by default they keep
    the window and one batch (llama-server's default; llama.cpp's C default is the full size).
    Far less KV memory at long contexts (docs/design.md has the figures); what it costs: a sequence
    can only be cut back as far as its window still reaches (SequenceMemory.cut)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch if n_ubatch is None else n_ubatch
    params.n_seq_max = n_seq_max
    params.kv_unified = kv_unified
    params.swa_full = swa_full
    params.n_threads = n_threads
    params.n_threads_batch = n_threads_batch or n_threads
    params.flash_attn_type = FLASH_ATTN[flash_attn]
    params.type_k = kv_type(cache_type_k, "cache_type_k")
    params.type_v = kv_type(cache_type_v, "cache_type_v")
    if pooling is not None:
        params.embeddings = True
        params.pooling_type = pooling
    params.no_perf = True
    return params


def kv_bytes_per_token(model: LlamaModel, cache_type_k: str, cache_type_v: str) -> int | None:
    """KV cache bytes one token takes in every layer, for plain attention; None where the layout
    is not that (recurrent and hybrid memory, sliding-window layers, DeepSeek's compressed MLA
    cache): those would be overestimated, and a context refused that fits."""
    m = model.model
    meta = model.metadata()
    arch = meta.get("general.architecture", "")
    if (llama_cpp.llama_model_is_recurrent(m) or llama_cpp.llama_model_is_hybrid(m)
            or llama_cpp.llama_model_n_swa(m) > 0 or f"{arch}.attention.kv_lora_rank" in meta):
        return None
    n_head, n_head_kv = int(llama_cpp.llama_model_n_head(m)), int(llama_cpp.llama_model_n_head_kv(m))
    if n_head <= 0 or n_head_kv <= 0:
        return None
    head = int(llama_cpp.llama_model_n_embd(m)) // n_head
    k_len = int(meta.get(f"{arch}.attention.key_length", head))
    v_len = int(meta.get(f"{arch}.attention.value_length", head))

    def size(name: str, n: int) -> float:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(KV_CACHE_TYPES[name.lower()])]
        return n * nbytes / block

    return int(int(llama_cpp.llama_model_n_layer(m)) * n_head_kv * (size(cache_type_k, k_len) + size(cache_type_v, v_len)))


def available_memory() -> int:
    """Bytes the system can still give (Linux: MemAvailable, page cache it can drop included)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_context_fits(model: LlamaModel, n_ctx: int, cache_type_k: str, cache_type_v: str) -> None:
    """Refuse, before llama.cpp allocates (and zeroes) it, a KV cache that cannot fit in memory,
    saying what would (llama.cpp would take minutes of swapping, or gigabytes, before failing)."""
    per_token = kv_bytes_per_token(model, cache_type_k, cache_type_v)
    if not per_token:
        return
    need, free = n_ctx * per_token, available_memory()
    if need <= free:
        return
    fits = free // per_token // 256 * 256
    hint = f"at most -c {fits} fits" if fits >= 256 else "no useful context fits"
    raise ModelLoadError(f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB of KV cache "
                         f"(-ctk {cache_type_k} -ctv {cache_type_v}) but {free / 2**30:.1f} GiB of memory is "
                         f"available: {hint} (a q8_0 cache, -ctk q8_0 -ctv q8_0, takes about half)")


def new_context(model: LlamaModel, params: llama_cpp.llama_context_params, *, verbose: bool,
                what: str) -> LlamaContext:
    """A context on loaded weights; a failure is one ModelLoadError line naming `what`."""
    try:
        return LlamaContext(model=model, params=params, verbose=verbose)
    except ValueError:
        raise ModelLoadError(f"llama.cpp could not create {what} of {params.n_ctx} tokens (out of memory, or an "
                             "unsupported cache type / flash-attention setting)") from None


def sliding_window(model: LlamaModel) -> int:
    """The model's attention window in tokens (Gemma 2/3, Cohere 2, gpt-oss ...); 0 where every
    layer attends to the whole sequence."""
    return max(0, int(llama_cpp.llama_model_n_swa(model.model)))


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


# -- decoding -------------------------------------------------------------------------------------


def decode(ctx: LlamaContext, batch: LlamaBatch) -> None:
    """llama_decode (ctypes releases the GIL meanwhile, so an asyncio server stays responsive)."""
    status = llama_cpp.llama_decode(ctx.ctx, batch.batch)
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")


def decode_embeddings(ctx: LlamaContext, embeddings: np.ndarray, positions: np.ndarray, seq_id: int, *,
                      non_causal: bool) -> None:
    """Image embeddings (rows of the model's input width) into one sequence at `positions`
    ((1, n), or (4, n) section-major for M-RoPE), in their own decode: llama.cpp takes a batch of
    token ids or of embeddings, not both. `non_causal`: the rows attend to each other both ways
    (Gemma 3), so they must all be in this one decode."""
    n, width = embeddings.shape
    rows = np.ascontiguousarray(embeddings, dtype=np.float32)
    base = rows.ctypes.data
    row_bytes = width * 4
    batch = llama_cpp.llama_batch_ext_init(ctx.ctx)
    if not batch:
        raise RuntimeError("llama_batch_ext_init failed")
    pos = (llama_cpp.llama_pos * 4)()
    n_sections = positions.shape[0]
    try:
        for i in range(n):
            row = llama_cpp.llama_embd(ctypes.cast(base + i * row_bytes, ctypes.POINTER(ctypes.c_float)), 1, width)
            idx = llama_cpp.llama_batch_ext_add_embd(batch, seq_id, row)
            if idx < 0:
                raise RuntimeError(f"llama_batch_ext_add_embd returned {idx}")
            for j in range(n_sections):
                pos[j] = int(positions[j, i])
            llama_cpp.llama_batch_ext_set_pos(batch, idx, pos)
        if non_causal:
            llama_cpp.llama_set_causal_attn(ctx.ctx, False)
        try:
            status = llama_cpp.llama_process(ctx.ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(ctx.ctx, True)
    finally:
        llama_cpp.llama_batch_ext_free(batch)
    if status != 0:
        raise RuntimeError(f"llama_process returned {status} for image embeddings")


def set_threads(ctx: LlamaContext, n_threads: int, n_threads_batch: int) -> None:
    llama_cpp.llama_set_n_threads(ctx.ctx, n_threads, n_threads_batch)


def logits(ctx: LlamaContext, index: int, n_vocab: int) -> np.ndarray:
    """The logits of the batch's `index`-th token: a view into llama.cpp's buffer, valid until the
    next decode."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, index), shape=(n_vocab,))


# -- sampling -------------------------------------------------------------------------------------


def sampler_chain(params: SamplingParams, *, vocab: llama_cpp.llama_vocab_p, n_vocab: int,
                  eog_ids: frozenset[int], penalty_last_n: int, seed: int | None) -> LlamaSampler | TopKFirst:
    """llama.cpp's sampler chain for one choice: grammar, logit_bias and ignore_eos bias, penalties over the last
    `penalty_last_n` tokens, then greedy or top-k / top-p / min-p / temperature / seeded draw. A chain that
    starts with a small top-k gets its top-k done from the logits (top_k.py), the rest by llama.cpp."""
    penalties = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
    bias = dict(params.logit_bias or {})
    if params.ignore_eos:
        bias.update({t: float("-inf") for t in eog_ids})
    if not params.greedy and not params.grammar and not penalties:
        from edge_llm.engines.top_k import TopKFirst, usable  # top_k.py imports this module

        if usable(params.top_k, n_vocab):  # the default chain: its top-k without a record per token
            return TopKFirst(params.top_k, _after_top_k(params, seed), n_vocab=n_vocab, bias=bias)
    sampler = LlamaSampler()
    if params.grammar:
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not grammar:
            sampler.close()
            raise InvalidParameterError("the grammar does not parse (llama.cpp GBNF)", param="grammar")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
    if bias:
        sampler.add_logit_bias(n_vocab, bias)
    if penalties:
        sampler.add_penalties(n_vocab, penalty_last_n, params.repetition_penalty,
                              params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        sampler.add_greedy()
        return sampler
    if params.top_k > 0:
        sampler.add_top_k(params.top_k)
    return _after_top_k(params, seed, sampler)


def _after_top_k(params: SamplingParams, seed: int | None, sampler: LlamaSampler | None = None) -> LlamaSampler:
    """The chain's steps after top-k: top-p, min-p, temperature, the seeded draw."""
    sampler = sampler or LlamaSampler()
    if params.top_p < 1.0:
        sampler.add_top_p(params.top_p, 1)
    if params.min_p > 0.0:
        sampler.add_min_p(params.min_p, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)
    return sampler


# -- KV memory by sequence ------------------------------------------------------------------------


class SequenceMemory:
    """A context's KV cells addressed by sequence (slot) id, and each sequence's state as bytes
    (what the prompt cache keeps).

    `window`: the context's model's sliding window (`sliding_window`; 0 without one). Sliding-window layers
    drop positions their window no longer sees (the cells are reused; a saved state leaves them
    out), so such a sequence cannot be cut back to any position: only to one whose window is still
    held (`cut`), and a restored state starts where its window does (`positions`)."""

    def __init__(self, ctx: LlamaContext) -> None:
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self.window = sliding_window(ctx.model)

    def cut(self, seq_id: int, keep: int) -> bool:
        """Drop the sequence's cells from position `keep` on; False where that cannot be done
        (nothing is dropped then): the memory type cannot drop a tail (recurrent models), or the
        sliding-window layers no longer hold the positions the token at `keep` attends to.

        The window check is llama-server's (its `pos_min_thold`): the lowest position the window
        layers hold (llama_memory_seq_pos_min reports theirs) must be at most keep - window. A
        rejected draft always passes it: a decode only reuses cells its first token no longer
        sees, so the window behind any position of the batch is still there afterwards."""
        if self.window and keep > 0:
            low, high = self.positions(seq_id)
            if keep <= high and low > max(0, keep - self.window):
                return False
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1))

    def clear(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds. With one KV pool (-kvu) the cells are shared; with a
        stream per sequence (the default) llama.cpp copies the cell list now and the KV data at the
        next decode, so `src`'s data must not be overwritten before then."""
        self.clear(dst)
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def positions(self, seq_id: int) -> tuple[int, int]:
        """The lowest and highest position the sequence holds (-1, -1 when empty)."""
        return (int(llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id)),
                int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id)))

    def read_state(self, seq_id: int) -> bytearray | None:
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
        state = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(state)
        written = llama_cpp.llama_state_seq_get_data(ctx, view, size, seq_id)
        del view  # release the export so the bytearray is an ordinary buffer again
        if written != size:
            log.warning("prompt cache: llama.cpp wrote %d of %d state bytes; not cached", written, size)
            return None
        return state

    def write_state(self, seq_id: int, state: bytes | bytearray) -> bool:
        """Load a saved state into an empty sequence; False when llama.cpp rejects the bytes."""
        src = (ctypes.c_uint8 * len(state)).from_buffer(state) if isinstance(state, bytearray) \
            else ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        read = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, src, len(state), seq_id)
        del src
        return read == len(state)
