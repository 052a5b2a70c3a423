"""The shared core of every architecture: hyperparameters, tensor names, dtypes and the GGUF file.

An architecture module subclasses `Model` and overrides only what differs: `modify` (split, permute
or rescale a tensor), `set_params` (extra keys) and `set_vocab`. Tensors stay lazy (`Lazy`) until
they are written, one at a time, so peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import errno
import logging
import os
import re
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
# Name parts of multimodal checkpoints' non-text tensors (llama.cpp's TextModel.filter_tensors).
_NOT_TEXT = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.",
             "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed", "patch_merger.",
             "patch_merge_mlp.", "model.connector.", "conformer.", "sound_encoder.", "sound_projection.",
             "speech_embeddings.")


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF stores q/k rotary halves split ([x0..x63, x64..x127]); llama.cpp's "normal" RoPE wants them
    interleaved: undo HF's permute (the inverse of the one in transformers' convert_llama_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def rope_factor_tensors(long: list | None, short: list | None, rope_dims: int) -> Iterator[tuple[str, Lazy]]:
    """LongRoPE's per-frequency factors as llama.cpp's `rope_factors_long/short` tensors."""
    if not long and not short:
        return
    if not long or not short or len(long) != len(short) or len(long) != rope_dims / 2:
        raise CheckpointError(f"LongRoPE needs {rope_dims // 2} long and short factors, the config has "
                              f"{len(long or [])} and {len(short or [])}")
    for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short)):
        data = np.array(factors, dtype=np.float32)
        yield gguf.TENSOR_NAMES[key] + ".weight", Lazy(data.shape, lambda data=data: data)


@dataclass
class PlannedTensor:
    name: str
    tensor: Lazy
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.tensor.shape, self.qtype)))


class Model:
    """An HF decoder-only checkpoint; a family subclasses it and changes only what differs.

    Most families differ from Llama in nothing but class attributes: the GGUF architecture, a q/k
    permutation (`permute_qk`), a norm offset (`norm_offset`), the tokenizer kind, config defaults.
    Tensor names come from gguf-py's TensorNameMap for the architecture. What needs code goes into
    `rename` (HF name -> the name the map knows, or None to skip), `modify` (split, permute, rescale),
    `extra_tensors` (tensors computed from the config), `set_params` and `set_vocab`.
    """

    arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...] = ()
    vocab_kind = "auto"  # "bpe" for families whose tokenizer.json wins over a stray tokenizer.model
    permute_qk = False  # llama.cpp's "normal" RoPE: undo HF's rotate-half layout of q and k
    norm_offset = 0.0  # Gemma's RMSNorm scales by (1 + weight): the 1 is added here, once
    # transformers' config-class defaults for keys that hub config.json files leave out (llama.cpp's
    # converter reads the config through transformers, which fills them in).
    defaults: dict = {}
    # Tensors every block has, and the model's own; a checkpoint without one of them is incomplete.
    block_tensors = _REQUIRED
    required_tensors = ("token_embd.weight", "output_norm.weight")
    skip_suffixes = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
    # Per-expert tensors (`...experts.3.w1.weight`) are stacked into one tensor per layer and kind.
    _EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<xid>\d+)\.(?P<kind>[^.]+)\.weight$")

    def __init__(self, hf_dir: Path, config: dict, tensors: dict[str, Lazy]):
        self.hf_dir, self.config, self.tensors = hf_dir, config, tensors
        self.hparams = hp = {**self.defaults, **config}
        try:
            self.block_count = int(self.find("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
            self.n_embd = int(self.find("hidden_size", "n_embd", "dim"))
            self.n_head = int(self.find("num_attention_heads", "n_head", "n_heads"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json lacks a usable {exc} for {type(self).__name__}") from None
        self.n_head_kv = int(self.find("num_key_value_heads", "n_kv_heads", default=None) or self.n_head)
        self.head_dim = int(hp.get("head_dim") or self.n_embd // self.n_head)
        self.n_experts = self.find("num_local_experts", "num_experts", "n_routed_experts", default=None)
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        self.rope = self._rope_parameters()
        theta = self.rope.get("full_attention", self.rope).get("rope_theta")
        self.rope_theta = float(theta) if theta is not None else None

    def find(self, *keys: str, default=KeyError):
        """The first of `keys` present in the config (or the family's defaults)."""
        for key in keys:
            if key in self.hparams:
                return self.hparams[key]
        if default is KeyError:
            raise KeyError(keys[0])
        return default

    def _rope_parameters(self) -> dict:
        """RoPE settings in transformers 5's `rope_parameters` shape, from either that or the older
        `rope_scaling` + top-level `rope_theta` of most hub configs (as llama.cpp's converter does)."""
        hp = self.hparams
        rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
        if "full_attention" in rope or "sliding_attention" in rope:
            return rope
        theta = self.find("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                          "rotary_emb_base", default=None)
        local = self.find("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                          "rope_local_base_freq", default=None)
        partial = self.find("partial_rotary_factor", "rope_pct", "rope_percent", default=None)
        original = hp.get("original_max_position_embeddings")
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and original is not None:
            rope["original_max_position_embeddings"] = original
        return rope

    # --- hyperparameters and vocabulary -------------------------------------------------------------
    def set_params(self, w: gguf.GGUFWriter) -> None:
        """The keys llama.cpp's converter writes for every text model (TextModel.set_gguf_parameters)."""
        hp = self.hparams
        w.add_block_count(self.block_count)
        n_ctx = self.find("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                          "model_max_length", default=None)
        if n_ctx is not None:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(self.n_embd)
        n_ff = self.find("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                         "n_inner", "hidden_dim", default=None)
        if n_ff is not None:
            w.add_feed_forward_length(int(n_ff))
        w.add_head_count(self.n_head)
        if self.find("num_key_value_heads", "n_kv_heads", default=None) is not None:
            w.add_head_count_kv(self.n_head_kv)
        if hp.get("is_causal") is False:
            w.add_causal_attention(False)
        rope = self.rope.get("full_attention", self.rope)
        rope_type, factor = rope.get("rope_type"), rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(rope[key])
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        elif rope_type not in (None, "default", "llama3", "dynamic", "mrope"):  # transformers reads "mrope" as default
            logger.warning("rope scaling %r is not carried over to the GGUF", rope_type)
        if "mrope_section" in self.rope:  # M-RoPE (Qwen2-VL): [time, height, width, extra] rotary sections
            w.add_rope_dimension_sections([*self.rope["mrope_section"], 0, 0, 0, 0][:4])
        if self.rope_theta is not None:
            w.add_rope_freq_base(self.rope_theta)
        local_theta = self.rope.get("sliding_attention", {}).get("rope_theta")
        if local_theta is not None:
            w.add_rope_freq_base_swa(local_theta)
        if (eps := self.find("rms_norm_eps", "norm_eps", default=None)) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (eps := self.find("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", default=None)) is not None:
            w.add_layer_norm_eps(eps)
        if self.n_experts is not None:
            w.add_expert_count(self.n_experts)
        if (used := self.find("num_experts_per_tok", "num_experts_per_token", "top_k_experts", default=None)) \
                is not None:
            w.add_expert_used_count(used)
        if hp.get("n_group") is not None:
            w.add_expert_group_count(hp["n_group"])
        if hp.get("topk_group") is not None:
            w.add_expert_group_used_count(hp["topk_group"])
        score = self.find("score_function", "scoring_func", "score_func", "moe_router_activation",
                          "moe_router_activation_func", "expert_selection_fn", default=None)
        if score is not None:
            gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
            if score not in gating:
                raise CheckpointError(f"unsupported expert gating function {score!r}")
            w.add_expert_gating_func(gating[score])
        if hp.get("head_dim") is not None:
            w.add_key_length(int(hp["head_dim"]))
            w.add_value_length(int(hp["head_dim"]))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), prefer=self.vocab_kind)

    # --- tensors --------------------------------------------------------------------------------------
    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CheckpointError(f"tensor {name!r} has no GGUF name for {gguf.MODEL_ARCH_NAMES[self.arch]}: "
                                  "the checkpoint does not match its config.json architecture")
        return new

    def rename(self, name: str) -> str | None:
        """The HF name as the tensor map knows it; None for tensors that are not the language model's
        (vision towers and projectors of multimodal checkpoints), as llama.cpp's converter filters them."""
        if (name.startswith(("mlp", "vit.", "vpm.", "siglip2.", "merger.", "resampler."))
                or any(part in name for part in _NOT_TEXT)):
            return None
        # Vision-language wrappers: `language_model.` (LLaVA, Gemma 3, InternVL), `model.text_model.`
        # (SmolVLM / Idefics3, whose names llama.cpp's map lists and gguf-py's release does not).
        return name.replace("language_model.", "").replace("model.text_model.", "model.")

    def expert_name(self, prefix: str, kind: str, bid: int) -> str:
        """The HF-style name of a layer's stacked experts of one kind, as the tensor map knows it."""
        return f"{prefix}.{kind}.weight"

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        """HF tensor -> GGUF tensor(s): the declared offset and permutation, then the name map."""
        if self.norm_offset and name.endswith("norm.weight"):
            tensor = tensor.then(lambda x: x + self.norm_offset)
        if self.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head))
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = tensor.then(lambda x: permute_qk(x, self.n_head, self.n_head_kv))
        yield self.map_name(name), tensor

    def extra_tensors(self) -> Iterable[tuple[str, Lazy]]:
        return ()

    def _stacked_experts(self) -> Iterator[tuple[str, Lazy]]:
        """The checkpoint's tensors with per-expert ones replaced by one stack per layer and kind, in
        the place of the group's first tensor. Each stack is read expert by expert when written."""
        groups: dict[tuple[str, str], dict[int, Lazy]] = {}
        for name, tensor in self.tensors.items():
            if (m := self._EXPERT.match(name)) is not None:
                groups.setdefault((m["prefix"], m["kind"]), {})[int(m["xid"])] = tensor
        done = set()
        for name, tensor in self.tensors.items():
            m = self._EXPERT.match(name)
            if m is None:
                yield name, tensor
                continue
            key = (m["prefix"], m["kind"])
            if key in done:
                continue
            done.add(key)
            experts = groups[key]
            if self.n_experts is None or sorted(experts) != list(range(int(self.n_experts))):
                raise CheckpointError(f"{m['prefix']}: {len(experts)} {m['kind']} experts in the checkpoint, "
                                      f"config.json says {self.n_experts}")
            bid = next(int(p) for p in m["prefix"].split(".") if p.isdecimal())
            yield self.expert_name(m["prefix"], m["kind"], bid), Lazy.stack([experts[i] for i in sorted(experts)])

    def gguf_tensors(self) -> Iterator[tuple[str, Lazy]]:
        yield from self.extra_tensors()  # first, as llama.cpp's converter writes them
        for name, tensor in self._stacked_experts():
            name = self.rename(name)
            if name is None or name.endswith(self.skip_suffixes):
                continue
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            yield from self.modify(name, tensor, bid)

    def expected_shapes(self) -> dict[str, tuple]:
        """GGUF tensor kind -> the shape config.json implies (numpy order); checked before writing."""
        vocab = self.hparams.get("vocab_size")
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        ff = self.hparams.get("intermediate_size")
        return {
            "token_embd": (vocab, self.n_embd), "output": (vocab, self.n_embd), "output_norm": (self.n_embd,),
            "attn_norm": (self.n_embd,), "ffn_norm": (self.n_embd,),
            "attn_q": (q, self.n_embd), "attn_q.bias": (q,), "attn_k": (kv, self.n_embd), "attn_k.bias": (kv,),
            "attn_v": (kv, self.n_embd), "attn_v.bias": (kv,), "attn_output": (self.n_embd, q),
            "ffn_gate": (ff, self.n_embd), "ffn_up": (ff, self.n_embd), "ffn_down": (self.n_embd, ff),
            "attn_q_norm": (self.head_dim,), "attn_k_norm": (self.head_dim,),
        }

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        kind = name.split(".", 2)[2] if name.startswith("blk.") else name
        kind = kind.removesuffix(".weight")
        shape = self.expected_shapes().get(kind)
        return None if shape is None or None in shape else tuple(int(d) for d in shape)

    def tensor_qtype(self, name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
        return tensor_qtype(name, shape, outtype)

    def plan(self, outtype: str) -> list[PlannedTensor]:
        """Every output tensor with its GGUF type, checked against config.json before anything is written."""
        planned = []
        for name, tensor in self.gguf_tensors():
            expected = self.expected_shape(name)
            if expected is not None and tuple(tensor.shape) != expected:
                raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)} but config.json implies "
                                      f"{list(expected)}: the weights do not match the config")
            planned.append(PlannedTensor(name, tensor, self.tensor_qtype(name, tensor.shape, outtype)))
        names = [p.name for p in planned]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"the checkpoint maps several tensors to {', '.join(dup[:3])}")
        missing = [n for n in self.required_tensors if n not in names]
        missing += [f"blk.{b}.{k}.weight" for b in range(self.block_count) for k in self.block_tensors
                    if f"blk.{b}.{k}.weight" not in names]
        if missing:
            raise CheckpointError(f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. "
                                  f"{', '.join(missing[:3])} (a shard may be absent)")
        return planned


class StreamingWriter(gguf.GGUFWriter):
    """GGUFWriter that takes each tensor's data as a sequence of row blocks, in the order of the
    tensor infos, so a tensor is never whole in memory (GGUFWriter.write_tensor_data wants it whole).
    A key written twice keeps its last value, as in GGUFWriter, without its warning: a family
    overrides a generic hyperparameter by writing it again."""

    def add_key_value(self, key, val, vtype, sub_type=None) -> None:
        self.kv_data[0][key] = gguf.GGUFValue(value=val, type=vtype, sub_type=sub_type)

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
    """The converted tensor in row blocks of the (rows, last dimension) matrix it is stored as (one
    block when it must be read whole). Quantization works along the last dimension, so converting
    block by block writes the same bytes as converting the whole tensor."""
    t = p.tensor
    step = max(1, _BLOCK_BYTES // max(4 * t.shape[-1], 1)) if t.shape else 1
    if t.rows is None or len(t.shape) < 2 or t.n_rows <= step:
        yield gguf.quants.quantize(t.load().astype(np.float32, copy=False), p.qtype)
        return
    for start in range(0, t.n_rows, step):
        rows = t.rows(start, min(start + step, t.n_rows))
        yield gguf.quants.quantize(rows.astype(np.float32, copy=False), p.qtype)


def disk_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


# Kept in F32 whatever the output type (llama.cpp's converter and quantizer agree on these).
_F32_KINDS = {gguf.TENSOR_NAMES[k].split(".")[-1] for k in (
    gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.POS_EMBD,
    gguf.MODEL_TENSOR.TOKEN_TYPES, gguf.MODEL_TENSOR.SSM_CONV1D, gguf.MODEL_TENSOR.SHORTCONV_CONV)}


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter rules: 1-D tensors, norms, biases, MoE routers and a few other small
    tensors stay F32; Q8_0 needs rows that are a multiple of its block (32), else F16."""
    stem, _, suffix = name.rpartition(".")
    if len(shape) <= 1 or name.endswith("_norm.weight") or suffix != "weight" or stem.split(".")[-1] in _F32_KINDS:
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
