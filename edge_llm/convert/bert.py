"""Encoders for embeddings and reranking: BERT (BGE, E5, MiniLM cross-encoders), XLM-RoBERTa
(multilingual-e5, BGE-M3, bge-reranker-v2-m3) and NomicBERT (nomic-embed-text v1/v1.5), with their
classification heads. llama.cpp runs them non-causally and pools the token states as the
checkpoint's sentence-transformers modules say (pooling.py); a classification head makes a
reranker (`cls` + `cls_out`, llama.cpp's rank pooling).

As llama.cpp's conversion/bert.py, except where noted: a BertForSequenceClassification keeps its
pooler (dense + tanh before the classifier, as transformers computes it), which llama.cpp's converter
drops, so its scores would not be the model's.
"""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.pooling import add_pooling
from edge_llm.convert.vocab import add_unigram_vocab, add_wordpiece_vocab, load_tokenizer_json

ENCODER_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                 "layer_output_norm")


class BertModel(Model):
    arch = gguf.MODEL_ARCH.BERT
    hf_architectures = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
    block_tensors = ENCODER_BLOCK
    required_tensors = ("token_embd.weight", "token_embd_norm.weight")
    prefix = "bert."  # of the task models' tensors (BertForSequenceClassification.bert ...)
    skip_suffixes = (*Model.skip_suffixes, "embeddings.position_ids")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        labels = self.hparams.get("id2label")
        labels = {int(k): v for k, v in labels.items()} if isinstance(labels, dict) else None
        if labels and len(labels) == 2 and labels.get(0) == "LABEL_0":
            labels = None  # the two dummy labels transformers' configs carry
        self.labels = labels
        self.classifier = any(name.startswith("classifier.") for name in self.tensors)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_causal_attention(False)
        add_pooling(w, self.hf_dir, self.hparams)
        if self.labels:
            w.add_classifier_output_labels([v for _, v in sorted(self.labels.items())])

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        w.add_token_type_count(self.hparams.get("type_vocab_size", 1))
        add_wordpiece_vocab(w, self.hf_dir, self.hparams.get("vocab_size"))

    def rename(self, name: str) -> str | None:
        name = name.removeprefix(self.prefix)
        if name.endswith(".gamma"):
            name = name[:-len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[:-len(".beta")] + ".bias"
        if name.startswith(("cls.predictions", "cls.seq_relationship", "lm_head.")):
            return None  # the masked-LM and next-sentence heads: not used for embeddings
        if name.startswith("pooler."):
            # A sequence classifier reads the pooled [CLS] state (dense + tanh), which llama.cpp's
            # rank pooling computes from the `cls` tensor; embeddings never use it.
            return name.replace("pooler.dense", "classifier.dense") if self.pooler_is_head else None
        return super().rename(name)

    @property
    def pooler_is_head(self) -> bool:
        return self.classifier and "classifier.dense.weight" not in self.tensors

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if self.pooler_is_head and name.startswith("classifier.") and not name.startswith("classifier.dense"):
            name = name.replace("classifier.", "classifier.out_proj.")  # a direct projection: cls_out
        yield from super().modify(name, tensor, bid)


class XLMRobertaModel(BertModel):
    """XLM-RoBERTa: BERT's graph with position ids starting after the padding id (the rows before
    are cut), and a SentencePiece unigram vocabulary."""

    hf_architectures = ("XLMRobertaModel", "XLMRobertaForSequenceClassification")
    prefix = "roberta."

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams.get("lora_adaptations"):
            raise CheckpointError("jina-embeddings-v3's task LoRAs are not supported; convert it with --llama-cpp")
        pad = self.hparams.get("pad_token_id")
        self.position_offset = None if pad is None else 1 + int(pad)
        if self.position_offset is not None and "max_position_embeddings" in self.hparams:
            self.hparams["max_position_embeddings"] -= self.position_offset

    @property
    def pooler_is_head(self) -> bool:
        return False  # RobertaClassificationHead has its own dense layer; the pooler is not read

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        add_unigram_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), self.hparams.get("type_vocab_size", 1))

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if name == "embeddings.position_embeddings.weight" and self.position_offset is not None:
            tensor = tensor.row_slice(self.position_offset, tensor.shape[0])
        yield from super().modify(name, tensor, bid)


class NomicBertModel(BertModel):
    """nomic-embed-text v1 / v1.5: BERT with rotary positions, a fused q/k/v, a SwiGLU feed-forward
    without biases, and norms after each block; its vocabulary is WordPiece or SentencePiece unigram."""

    arch = gguf.MODEL_ARCH.NOMIC_BERT
    hf_architectures = ("NomicBertModel",)
    block_tensors = ("attn_qkv", "attn_output", "attn_output_norm", "ffn_up", "ffn_gate", "ffn_down",
                     "layer_output_norm")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hparams
        if hp.get("moe_every_n_layers"):
            raise CheckpointError("nomic-embed-text-v2-moe (NomicBERT with experts) is not supported; convert it "
                                  "with --llama-cpp")
        positions = (hp.get("n_positions"), hp.get("max_trained_positions", 2048))
        if positions not in ((8192, 2048), (2048, 2048)):
            raise CheckpointError(f"config.json: unrecognized n_positions / max_trained_positions {positions}")
        hp["n_positions"] = 2048  # nomic-embed-text v1 and v1.5 are trained for 2048 tokens
        expected = {"activation_function": "swiglu", "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False,
                    "mlp_fc2_bias": False, "prenorm": False, "rotary_emb_fraction": 1.0,
                    "rotary_emb_interleaved": False, "rotary_emb_scale_base": None}
        wrong = {k: hp.get(k) for k, v in expected.items() if hp.get(k, v) != v}
        if wrong:
            raise CheckpointError(f"config.json: a NomicBERT variant llama.cpp does not run ({wrong})")
        _, data = load_tokenizer_json(self.hf_dir)
        self.unigram = data.get("model", {}).get("type") == "Unigram"
        if self.unigram and hp.get("pad_token_id") is not None and "max_position_embeddings" in hp:
            hp["max_position_embeddings"] -= 1 + int(hp["pad_token_id"])  # as XLM-RoBERTa's (llama.cpp does)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.hparams.get("head_dim") is None:  # transformers' NomicBertConfig fills it in for llama.cpp's converter
            w.add_key_length(self.n_embd // self.n_head)
            w.add_value_length(self.n_embd // self.n_head)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if self.unigram:
            add_unigram_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), self.hparams.get("type_vocab_size", 1))
        else:
            super().set_vocab(w)
