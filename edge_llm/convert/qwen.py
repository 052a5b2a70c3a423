"""Qwen2 (Qwen1.5, Qwen2, Qwen2.5: q/k/v biases), Qwen3 (q/k RMS norms) and their MoE versions
(Qwen1.5-MoE / Qwen2-MoE with a gated shared expert, Qwen3-MoE): llama.cpp runs them with NEOX-style
RoPE, which is HF's own layout, so no q/k permutation; experts are stacked per layer.

Qwen3-Embedding is a Qwen3 whose sentence-transformers modules pool the last token (pooling.py).
Qwen3-Reranker is a Qwen3 chat model that answers "yes" or "no": its head is cut to those two rows
(`cls_out`), which llama.cpp's rank pooling turns into P(yes), with the prompt as a named template."""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import CheckpointError, Lazy
from edge_llm.convert.pooling import add_pooling

MOE_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


# Qwen3-Reranker's prompt, as llama.cpp's converter writes it (llama-server fills in the query and document).
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


class Qwen2Model(Model):
    arch = gguf.MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)
    vocab_kind = "bpe"

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        add_pooling(w, self.hf_dir, self.hparams)  # gte-Qwen2 and other Qwen embedders


class Qwen3Model(Qwen2Model):
    arch = gguf.MODEL_ARCH.QWEN3
    hf_architectures = ("Qwen3ForCausalLM", "Qwen3Model")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rerank_rows: tuple[int, int] | None = self._rerank_rows() if self.is_reranker() else None

    def is_reranker(self) -> bool:
        """llama.cpp's test: the model card's title, the folder's or the config's names, or a
        sequence-classification architecture. The hub repository of a cached snapshot counts as a name."""
        from edge_llm.convert import source_repo

        readme = self.hf_dir / "README.md"
        text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
        if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text:
            return True
        arch = (self.config.get("architectures") or [""])[0] or ""
        hints = [self.hf_dir.name, str(self.hparams.get("_name_or_path", "")), str(self.hparams.get("model_type", "")),
                 arch, source_repo(self.hf_dir) or ""]
        if any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints):
            return True
        return "sequenceclassification" in arch.lower()

    def _rerank_rows(self) -> tuple[int, int]:
        from edge_llm.convert.vocab import load_tokenizer_json

        tokenizer, _ = load_tokenizer_json(self.hf_dir)
        yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
        if yes is None or no is None:
            raise CheckpointError(f"{self.hf_dir}: a Qwen3 reranker's vocabulary needs the tokens 'yes' and 'no'")
        return yes, no

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        if name is not None and self.config.get("architectures", [None])[0] == "Qwen3Model":
            name = f"model.{name}"  # a bare Qwen3Model's tensors, as Qwen3ForCausalLM names them
        return name

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.rerank_rows is not None:
            w.add_pooling_type(gguf.PoolingType.RANK)
            w.add_classifier_output_labels(["yes", "no"])
            w.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])

    def modify(self, name: str, tensor: Lazy, bid: int | None) -> Iterable[tuple[str, Lazy]]:
        if self.rerank_rows is not None:
            tied = bool(self.hparams.get("tie_word_embeddings", False))
            if (tied and "embed_tokens" in name) or (not tied and "lm_head" in name):
                yes, no = self.rerank_rows
                head = Lazy((2, tensor.shape[1]), lambda: np.stack([tensor.rows(yes, yes + 1)[0],
                                                                     tensor.rows(no, no + 1)[0]])
                            if tensor.rows is not None else tensor.load()[[yes, no]])
                yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT] + ".weight", head
                if tied:
                    yield from super().modify(name, tensor, bid)
                return
        yield from super().modify(name, tensor, bid)


class Qwen2MoeModel(Model):
    arch = gguf.MODEL_ARCH.QWEN2MOE
    hf_architectures = ("Qwen2MoeForCausalLM",)
    vocab_kind = "bpe"
    block_tensors = MOE_BLOCK

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        if self.hparams.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(self.hparams["moe_intermediate_size"])
        if self.hparams.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(self.hparams["shared_expert_intermediate_size"])


class Qwen3MoeModel(Qwen2MoeModel):
    arch = gguf.MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
