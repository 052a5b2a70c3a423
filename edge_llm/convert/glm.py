"""GLM: ChatGLM3 and GLM-4-9B-chat (ChatGLMModel, remote code on the hub; and GlmForCausalLM, the
transformers version of GLM-4-9B-chat) as llama.cpp's CHATGLM, and GLM-4-0414 (Glm4ForCausalLM) as
GLM4. RoPE on half of each head, on interleaved pairs: llama.cpp's own layout, so no permutation;
gate and up stay fused (llama.cpp splits them)."""

from __future__ import annotations

import gguf

from edge_llm.convert.base import Model
from edge_llm.convert.checkpoint import CheckpointError
from edge_llm.convert.vocab import (
    add_bpe_vocab,
    added_tokens,
    load_sentencepiece,
    special_vocab,
)

# ChatGLM3's tokenizer appends these after its SentencePiece pieces (tokenization_chatglm.py).
CHATGLM3_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>")


def _glm_special_tokens(model: Model, w: gguf.GGUFWriter, n_vocab: int, bos: bool) -> None:
    """GLM-4's ids, as llama.cpp's converter sets them where the tokenizer files leave them out: eos
    and unk <|endoftext|>, end of turn <|user|> (and bos <|endoftext|> for GLM-4-0414)."""
    ids = {text: tid for tid, text in added_tokens(model.hf_dir)}
    missing = [t for t in ("<|endoftext|>", "<|user|>") if t not in ids]
    if missing:
        raise CheckpointError(f"{model.hf_dir}: GLM tokenizer without {', '.join(missing)}")
    special = special_vocab(model.hf_dir, load_merges=True)
    special._set_special_token("eos", ids["<|endoftext|>"])
    special._set_special_token("eot", ids["<|user|>"])
    special._set_special_token("unk", ids["<|endoftext|>"])
    if bos:
        special._set_special_token("bos", ids["<|endoftext|>"])
    special.add_to_gguf(w, quiet=True)


class ChatGLMModel(Model):
    arch = gguf.MODEL_ARCH.CHATGLM
    hf_architectures = ("ChatGLMModel", "ChatGLMForConditionalGeneration", "GlmForCausalLM")
    block_tensors = ("attn_norm", "attn_output", "ffn_norm", "ffn_up", "ffn_down")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hp = self.hparams
        self.n_head_kv = int(hp.get("multi_query_group_num", hp.get("num_key_value_heads", self.n_head)))
        self.head_dim = int(hp.get("kv_channels") or hp.get("head_dim") or self.n_embd // self.n_head)

    @property
    def is_chatglm3(self) -> bool:
        return "THUDM/chatglm3-6b" in self.hparams.get("_name_or_path", "")

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        if name is None or name.endswith(".rotary_pos_emb.inv_freq"):  # computed by llama.cpp
            return None
        return name.removeprefix("transformer.")

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if self.is_chatglm3:
            self._chatglm3_vocab(w)
        elif (self.hf_dir / "tokenizer.json").is_file():
            n_vocab = add_bpe_vocab(w, self.hf_dir, self.hparams.get("padded_vocab_size", self.hparams.get("vocab_size")),
                                    special=False, regex_pre={"llama-bpe": "chatglm-bpe"})
            _glm_special_tokens(self, w, n_vocab, bos=False)
        else:
            raise CheckpointError(f"{self.hf_dir}: this GLM checkpoint's tokenizer is remote code (tiktoken), "
                                  "which edge-llm does not run; convert the transformers version (…-hf) instead")

    def _chatglm3_vocab(self, w: gguf.GGUFWriter) -> None:
        """ChatGLM3's tokenizer (tokenization_chatglm.py, not run here): SentencePiece pieces, then its
        special tokens; ids 0-2 named <unk>, <bos>, <eos>; pieces past the model left empty are padding."""
        sp = load_sentencepiece(self.hf_dir)
        n_sp = sp.vocab_size()
        n = int(self.hparams.get("padded_vocab_size") or n_sp + len(CHATGLM3_SPECIAL))
        special_ids = {n_sp + i: text for i, text in enumerate(CHATGLM3_SPECIAL)}
        tokens, scores, types = [], [], []
        for i in range(n):
            if i in special_ids:
                piece = special_ids[i]
            elif i in (sp.eos_id(), sp.bos_id(), sp.unk_id()) or i > n_sp:
                piece = ""
            else:
                piece = sp.IdToPiece(i) if i < n_sp else ""
            piece = {0: "<unk>", 1: "<bos>", 2: "<eos>"}.get(i, piece)
            scores.append(sp.GetScore(i) if piece and i < n_sp else 0.0)
            if i >= n_sp:
                kind = (gguf.TokenType.CONTROL if piece in CHATGLM3_SPECIAL else
                        gguf.TokenType.UNUSED if not piece else gguf.TokenType.USER_DEFINED)
                tokens.append((piece or f"[PAD{i}]").encode())
            else:
                kind = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                        else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                        else gguf.TokenType.NORMAL)
                tokens.append(piece.encode())
            types.append(kind)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("chatglm-spm")  # llama.cpp then writes the "[gMASK]sop" prefix
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special_vocab(self.hf_dir, len(tokens)).add_to_gguf(w, quiet=True)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        """ChatGLM's own list, as llama.cpp's converter writes it."""
        hp = self.hparams
        w.add_context_length(int(hp.get("seq_length", self.n_embd)))
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(int(hp.get("ffn_hidden_size", hp.get("intermediate_size", 4 * self.n_embd))))
        w.add_block_count(self.block_count)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(hp.get("layernorm_epsilon", 1e-5))
        rope_dim = hp["attention_dim"] if "attention_dim" in hp else self.n_embd // self.n_head
        w.add_rope_dimension_count(int(rope_dim * self.rope.get("partial_rotary_factor", 0.5)))
        w.add_add_bos_token(False)
        w.add_rope_freq_base(10000 * hp.get("rope_ratio", 1))

    def expected_shapes(self) -> dict[str, tuple]:
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        ff = self.hparams.get("ffn_hidden_size", self.hparams.get("intermediate_size"))
        vocab = self.hparams.get("padded_vocab_size", self.hparams.get("vocab_size"))
        return {**super().expected_shapes(), "token_embd": (vocab, self.n_embd), "output": (vocab, self.n_embd),
                "attn_qkv": (q + 2 * kv, self.n_embd), "attn_qkv.bias": (q + 2 * kv,),
                "ffn_up": (2 * ff, self.n_embd), "ffn_down": (self.n_embd, ff)}


class Glm4Model(Model):
    """GLM-4-0414 (GLM-4-9B-0414, GLM-Z1): post-norms after attention and MLP, partial RoPE."""

    arch = gguf.MODEL_ARCH.GLM4
    hf_architectures = ("Glm4ForCausalLM",)
    block_tensors = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_norm",
                     "ffn_up", "ffn_down", "post_ffw_norm")

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        n_vocab = add_bpe_vocab(w, self.hf_dir, self.hparams.get("vocab_size"), special=False,
                                regex_pre={"llama-bpe": "glm4"})
        _glm_special_tokens(self, w, n_vocab, bos=True)

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        w.add_rope_dimension_count(int(self.head_dim * self.rope.get("partial_rotary_factor", 0.5)))

    def expected_shapes(self) -> dict[str, tuple]:
        return {**super().expected_shapes(), "ffn_up": (2 * self.hparams["intermediate_size"], self.n_embd)}
