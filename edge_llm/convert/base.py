"""The shared core of every architecture: hyperparameters, tensor names, dtypes and the GGUF file.

An architecture module subclasses `Model` and overrides only what differs: `modify` (split, permute
or rescale a tensor), `set_params` (extra keys) and `set_vocab`. Tensors stay lazy (`Lazy`) until
they are written, one at a time, so peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.vocab import add_vocab

logger = logging.getLogger(__name__)

OUTTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# Tensors every Llama-like block needs; a checkpoint without one of them is incomplete.
# Large tensors read from disk are converted in row blocks of about this many float32 bytes.
_BLOCK_BYTES = 16 * 2**20
_REQUIRED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF stores q/k rotary halves split ([x0..x63, x64..x127]); llama.cpp's "normal" RoPE wants them
    interleaved: undo HF's permute (the inverse of the one in transformers' convert_llama_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@dataclass
class PlannedTensor:
    name: str
    tensor: Lazy
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.tensor.shape, self.qtype)))


class Model:
    """An HF decoder-only checkpoint of the Llama family tree; subclasses name their architecture."""

    arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...] = ()
    vocab_kind = "auto"  # "bpe" for families whose tokenizer.json wins over a stray tokenizer.model
    skip_suffixes = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

    def __init__(self, hf_dir: Path, config: dict, tensors: dict[str, Lazy]):
        self.hf_dir, self.config, self.tensors = hf_dir, config, tensors
        try:
            self.block_count = int(config["num_hidden_layers"])
            self.n_embd = int(config["hidden_size"])
            self.n_head = int(config["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json lacks a usable {exc} for {type(self).__name__}") from None
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        self.rope = {**rope, "rope_type": rope.get("rope_type", rope.get("type"))}
        theta = config.get("rope_theta") or rope.get("rope_theta")  # transformers 5 moved it into rope_parameters
        self.rope_theta = float(theta) if theta else None

    # --- hyperparameters and vocabulary -------------------------------------------------------------
    def set_params(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_block_count(self.block_count)
        n_ctx = next((c[k] for k in ("max_position_embeddings", "max_sequence_length", "model_max_length")
                      if c.get(k)), None)
        if n_ctx:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(int(c["intermediate_size"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        if self.rope_theta:
            w.add_rope_freq_base(self.rope_theta)
        w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        if c.get("head_dim"):
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        factor = self.rope.get("factor")
        if self.rope["rope_type"] == "linear" and factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif self.rope["rope_type"] == "yarn" and factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
        elif self.rope["rope_type"] not in (None, "default", "llama3"):
            logger.warning("rope scaling %r is not carried over to the GGUF", self.rope["rope_type"])

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_vocab(w, self.hf_dir, self.config.get("vocab_size"), prefer=self.vocab_kind)

    # --- tensors --------------------------------------------------------------------------------------
    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CheckpointError(f"tensor {name!r} has no GGUF name for {gguf.MODEL_ARCH_NAMES[self.arch]}: "
                                  "the checkpoint does not match its config.json architecture")
        return new

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        """HF tensor -> GGUF tensor(s); architectures override this to split, permute or rescale."""
        yield self.map_name(name), tensor

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        return ()

    def gguf_tensors(self) -> Iterator[tuple[str, Lazy]]:
        for name, tensor in self.tensors.items():
            if name.endswith(self.skip_suffixes):
                continue
            parts = name.split(".")
            bid = next((int(p) for p in parts if p.isdigit()), None)
            yield from self.modify(name, tensor, bid)
        yield from self.extra_tensors()

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape config.json implies for a GGUF tensor (numpy order), None when it implies none."""
        vocab = self.config.get("vocab_size")
        q, kv, ff = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.config["intermediate_size"]
        kind = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
        weight = name.endswith(".weight")
        table = {
            "token_embd": (vocab, self.n_embd), "output": (vocab, self.n_embd), "output_norm": (self.n_embd,),
            "attn_norm": (self.n_embd,), "ffn_norm": (self.n_embd,),
            "attn_q": (q, self.n_embd) if weight else (q,), "attn_k": (kv, self.n_embd) if weight else (kv,),
            "attn_v": (kv, self.n_embd) if weight else (kv,), "attn_output": (self.n_embd, q),
            "ffn_gate": (ff, self.n_embd), "ffn_up": (ff, self.n_embd), "ffn_down": (self.n_embd, ff),
            "attn_q_norm": (self.head_dim,), "attn_k_norm": (self.head_dim,),
        }
        shape = table.get(kind)
        return None if shape is None or None in shape else tuple(int(d) for d in shape)

    def plan(self, outtype: str) -> list[PlannedTensor]:
        """Every output tensor with its GGUF type, checked against config.json before anything is written."""
        planned = []
        for name, tensor in self.gguf_tensors():
            expected = self.expected_shape(name)
            if expected is not None and tuple(tensor.shape) != expected:
                raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)} but config.json implies "
                                      f"{list(expected)}: the weights do not match the config")
            planned.append(PlannedTensor(name, tensor, tensor_qtype(name, tensor.shape, outtype)))
        names = {p.name for p in planned}
        missing = [n for n in ["token_embd.weight", "output_norm.weight"] if n not in names]
        missing += [f"blk.{b}.{k}.weight" for b in range(self.block_count) for k in _REQUIRED
                    if f"blk.{b}.{k}.weight" not in names]
        if missing:
            raise CheckpointError(f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. "
                                  f"{', '.join(missing[:3])} (a shard may be absent)")
        return planned


class StreamingWriter(gguf.GGUFWriter):
    """GGUFWriter that takes each tensor's data as a sequence of row blocks, in the order of the
    tensor infos, so a tensor is never whole in memory (GGUFWriter.write_tensor_data wants it whole)."""

    def write_tensor_blocks(self, blocks: Iterable[np.ndarray], nbytes: int) -> None:
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(f"expected the tensor infos to be written, got {self.state}")
        fout = self.fout[0]
        name = next(iter(self.tensors[0]))
        if self.tensors[0].pop(name).nbytes != nbytes:
            raise CheckpointError(f"internal error: {name} size does not match its tensor info")
        self.write_padding(fout, fout.tell())
        written = 0
        for block in blocks:
            block = np.ascontiguousarray(block)
            fout.write(block.data.cast("B"))
            written += block.nbytes
        if written != nbytes:
            raise CheckpointError(f"internal error: {name} wrote {written} bytes, expected {nbytes}")
        self.write_padding(fout, nbytes)
        self.state = WriterState.WEIGHTS


def _blocks(p: PlannedTensor) -> Iterator[np.ndarray]:
    """The converted tensor in row blocks (one block when it must be read whole)."""
    shape = p.tensor.shape
    row_bytes = 4 * int(np.prod(shape[1:])) if len(shape) > 1 else 4 * int(np.prod(shape))
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    if p.tensor.rows is None or len(shape) < 2 or shape[0] <= step:
        yield gguf.quants.quantize(p.tensor.load().astype(np.float32, copy=False), p.qtype)
        return
    for start in range(0, shape[0], step):
        rows = p.tensor.rows(start, min(start + step, shape[0]))
        yield gguf.quants.quantize(rows.astype(np.float32, copy=False), p.qtype)


def disk_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter rules: norms and other 1-D tensors stay F32; Q8_0 needs rows that are a
    multiple of its block (32) and falls back to F16 otherwise."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = _QTYPES[outtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def write_gguf(model: Model, path: Path, outtype: str, metadata: Callable[[gguf.GGUFWriter, int], None],
               progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write `model` to `path` (the caller's temporary name), streaming one tensor at a time."""
    planned = model.plan(outtype)
    total = sum(p.nbytes for p in planned)
    free = disk_free(path.parent)
    if total > free:
        raise CheckpointError(f"not enough disk space in {path.parent}: the GGUF needs about "
                              f"{total / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")
    w = StreamingWriter(None, gguf.MODEL_ARCH_NAMES[model.arch])
    metadata(w, sum(int(np.prod(p.tensor.shape)) for p in planned))
    model.set_params(w)
    w.add_file_type(OUTTYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    model.set_vocab(w)
    for p in planned:
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(p.name, p.tensor.shape, np.dtype(dtype), p.nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(p.tensor.shape, p.qtype)
            w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.kv_data = [{}]  # the vocabulary's Python strings are on disk now: free them before the tensors
        w.write_ti_data_to_file()
        for i, p in enumerate(planned):
            w.write_tensor_blocks(_blocks(p), p.nbytes)
            if progress:
                progress(i + 1, len(planned), p.name)
        w.flush()
        os.fsync(w.fout[0].fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing {path.parent} (the GGUF needs about "
                                  f"{total / 2**20:.0f} MiB)") from None
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        w.close()
