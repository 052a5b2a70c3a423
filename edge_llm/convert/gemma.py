"""Gemma, Gemma 2 and Gemma 3 (also the language model inside Gemma3ForConditionalGeneration).

All three scale by (1 + weight) in their RMSNorms, so 1 is added to every norm weight once here;
the output layer is the tied embedding (a stray lm_head is dropped, as llama.cpp's converter does);
their SentencePiece vocabularies add no dummy prefix. Gemma 2 adds logit soft-capping and a
sliding window; Gemma 3 has q/k norms, a local RoPE base for its sliding layers, and drops
embedding rows past the tokenizer's vocabulary. Gemma3ForConditionalGeneration's vision half is
`Gemma3Projector`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import Lazy
from edge_llm.convert.mmproj import Projector
from edge_llm.convert.vocab import add_bpe_vocab, add_sentencepiece_vocab

GEMMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
               "ffn_down")
# llama.cpp's converter marks CodeGemma's end of turn for every GemmaForCausalLM (its fill-in-the-
# middle ids 67-70 too, but gguf-py has no keys for those, so only this one reaches the file).
CODEGEMMA_EOT = 107


class GemmaModel(Model):
    arch = gguf.MODEL_ARCH.GEMMA
    hf_architectures = ("GemmaForCausalLM",)
    norm_offset = 1.0
    skip_suffixes = (*Model.skip_suffixes, "lm_head.weight")
    block_tensors = GEMMA_BLOCK

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), space_prefix=False)
        w.add_eot_token_id(CODEGEMMA_EOT)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        """Gemma's own short list (llama.cpp's converter writes no RoPE base for Gemma 1 and 2)."""
        hp = self.hparams
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.block_count)
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)


class Gemma2Model(GemmaModel):
    arch = gguf.MODEL_ARCH.GEMMA2
    hf_architectures = ("Gemma2ForCausalLM",)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), space_prefix=False)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_attn_logit_softcapping(self.hparams["attn_logit_softcapping"])
        w.add_final_logit_softcapping(self.hparams["final_logit_softcapping"])
        w.add_sliding_window(self.hparams["sliding_window"])


class Gemma3Model(GemmaModel):
    arch = gguf.MODEL_ARCH.GEMMA3
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    skip_suffixes = Model.skip_suffixes  # Gemma 3 keeps an untied lm_head
    # Gemma3TextConfig's defaults: the text_config of Gemma3ForConditionalGeneration checkpoints
    # leaves most of these out.
    defaults = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
                "sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None}

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.hf_dir / "tokenizer.model").is_file():
            add_sentencepiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), space_prefix=False)
        else:
            add_bpe_vocab(w, self.hf_dir, self.hparams.get("vocab_size"))

    def set_params(self, w: gguf.GGUFWriter) -> None:
        Model.set_params(self, w)
        hp = self.hparams
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_freq_base(self.rope.get("full_attention", self.rope).get("rope_theta", 1_000_000.0))
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        if hp.get("sliding_window_pattern") != 1:
            w.add_sliding_window(hp["sliding_window"])

    def vocab_rows(self) -> int:
        """Embedding rows llama.cpp keeps: the tokenizer's (Gemma 3 pads its embedding past them)."""
        if (self.hf_dir / "tokenizer.model").is_file():
            return int(self.hparams["vocab_size"])
        data = json.loads((self.hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if name.endswith("embed_tokens.weight") and tensor.shape[0] > self.vocab_rows():
            tensor = tensor.row_slice(0, self.vocab_rows())
        yield from super().modify(name, tensor, bid)

    def expected_shapes(self) -> dict[str, tuple]:
        return {**super().expected_shapes(), "token_embd": (self.vocab_rows(), self.n_embd)}


class Gemma3Projector(Projector):
    """Gemma 3's SigLIP tower and its projector (average pool, RMS norm, one matrix). The hub's
    checkpoints name the tower `vision_tower.vision_model.*`; transformers 5 saves it as
    `vision_tower.*`: both are read (llama.cpp's converter knows only the first)."""

    kept_f32 = (".embeddings.",)

    hf_architectures = ("Gemma3ForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.GEMMA3

    def owns(self, name: str) -> str | None:
        name = name.removeprefix("model.") if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) \
            else name
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        if "vision_model.head." in name:  # SigLIP's pooling head: Gemma 3 does not use it
            return None
        if not name.startswith(("multi_modal_projector.", "vision_tower.", "multimodal_projector.", "vision_model.")):
            return None
        return name.replace("_weight", ".weight")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_vision_attention_layernorm_eps(self.vision.get("layer_norm_eps", 1e-6))
        w.add_vision_use_gelu(True)
        # Tokens per image = (patches per side / this factor)^2; llama.cpp assumes 4 (896-pixel images,
        # 14-pixel patches, 256 tokens) and writes the key only for other shapes.
        per_side = int(self.preprocessor.get("image_seq_length", 256) ** 0.5)
        factor = (self.vparam("image_size") // self.vparam("patch_size")) // per_side
        if factor > 0 and factor != 4:
            w.add_vision_projector_scale_factor(factor)

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if "soft_emb_norm.weight" in name:  # Gemma's RMSNorm scales by (1 + weight)
            tensor = tensor.then(lambda x: x + 1)
        yield from super().modify(name, tensor, bid)

    def forced_qtype(self, hf_name: str, name: str, outtype: str) -> gguf.GGMLQuantizationType | None:
        if "input_projection" in hf_name:  # llama.cpp issue 13025: kept F16 whatever the output type
            return gguf.GGMLQuantizationType.F16
        return super().forced_qtype(hf_name, name, outtype)
