"""Tiny random-weight embedding and reranker checkpoints (BERT, XLM-RoBERTa, NomicBERT, Qwen3-Embedding,
Qwen3-Reranker and the cross-encoders), built on the fly with tokenizers trained here: WordPiece
(BERT's), SentencePiece unigram (XLM-RoBERTa's, as `sentencepiece.bpe.model` and as a tokenizer.json
Unigram) and SmolLM2's byte-level BPE dressed as Qwen's. Each checkpoint carries the
sentence-transformers modules of its kind (`modules.json`, `1_Pooling/config.json`, `2_Normalize`).

`EMBEDDING_FAMILIES` (at the end) is the catalogue the converter, engine and server tests run, in
tests/tiny_models.py's `Family` shape. Each builder returns a `TinyEncoder`: the folder, its kind
and pooling, and how to compute the reference (sentence-transformers, or transformers for
Qwen3-Reranker, whose model card computes P(yes) with transformers).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tiny_models import QWEN2_REGEX, Family, copy_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "A cat sat on the mat, and the dog slept.",
    "Retrieval augmented generation finds passages that answer a question.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Embeddings map sentences to vectors; rerankers score a query against documents.",
    "我想在apple工作 北京 上海 你好世界 欢迎", "naïve café résumé über straße",
    "def f(x):\n    return x ** 2  # code", "Numbers 0123456789 and symbols !?.,;:()[]",
]
# What the tests embed and rerank: English, accents, CJK, digits, punctuation.
TEXTS = ["The cat sat on the mat.", "A dog slept by the door.", "Paris is the capital of France.",
         "我想在北京工作", "naïve café, 12345 times!"]
QUERY = "What is the capital of France?"
SMALL_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     initializer_range=0.2)


@dataclass
class TinyEncoder:
    path: Path
    kind: str  # "embedding" or "rerank"
    # texts -> vectors (embedding) or (query, documents) -> scores (rerank): the reference
    reference: Callable


# --- tokenizers -----------------------------------------------------------------------------------

def train_wordpiece(folder: Path, lowercase: bool = True, corpus: list[str] | None = None,
                    vocab_size: int = 400) -> Path:
    """A BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, [CLS] $A [SEP]) saved by transformers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus or CORPUS * 20, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                             special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                          do_lower_case=lowercase)
    fast.save_pretrained(folder)
    return folder


def train_unigram(folder: Path, corpus: list[str] | None = None, vocab_size: int = 300) -> Path:
    """XLM-RoBERTa's layout: a SentencePiece unigram model with NFKC normalization (a precompiled
    charsmap) and <unk> 0, <s> 1, </s> 2, saved as `sentencepiece.bpe.model`, and its tokenizer.json
    as XLM-RoBERTa's hub repositories have it: fairseq ids (<s> 0, <pad> 1, </s> 2, <unk> 3, each
    piece one id later, <mask> last), the charsmap as a Precompiled normalizer, Metaspace, <s> $A </s>."""
    import sentencepiece as spm
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or CORPUS * 40), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    from edge_llm.convert.vocab import sentencepiece_specs

    charsmap = sentencepiece_specs(folder / "sentencepiece.bpe.model")["precompiled_charsmap"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(3, sp.vocab_size())] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "<pad>", "</s>", "<unk>")])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                                pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({"tokenizer_class": "XLMRobertaTokenizer", "clean_up_tokenization_spaces": True})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def qwen_tokenizer(bpe_dir: Path, folder: Path, eos_after: bool) -> Path:
    """SmolLM2's byte-level BPE with Qwen2's split regex and Qwen's <|endoftext|> / chat markers;
    `eos_after`: the post-processor appends <|endoftext|> (Qwen3-Embedding's tokenizer does)."""
    from tokenizers import AddedToken, Tokenizer, processors

    copy_bpe_tokenizer(bpe_dir, folder, QWEN2_REGEX)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    eos = tok.token_to_id("<|endoftext|>")
    if eos_after:
        tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1",
                                                           special_tokens=[("<|endoftext|>", eos)])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    config.update({"bos_token": None, "eos_token": "<|im_end|>" if not eos_after else "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False})
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def build_encoder_tokenizers(root: Path, demo_path: Path) -> Path:
    import transformers

    train_wordpiece(root / "wordpiece")
    train_unigram(root / "unigram")
    smol = transformers.AutoTokenizer.from_pretrained(demo_path.parent, gguf_file=demo_path.name)
    smol.save_pretrained(root / "bpe")
    qwen_tokenizer(root / "bpe", root / "qwen3-embedding", eos_after=True)
    qwen_tokenizer(root / "bpe", root / "qwen3-reranker", eos_after=False)
    return root


# --- sentence-transformers modules -----------------------------------------------------------------

def write_st_modules(folder: Path, pooling: str, normalize: bool = True) -> None:
    """modules.json, 1_Pooling/config.json (and 2_Normalize) as sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    n_embd = json.loads((folder / "config.json").read_text()).get("hidden_size") or \
        json.loads((folder / "config.json").read_text())["n_embd"]
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": n_embd, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken", "include_prompt": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))


def _scramble(model, seed: int) -> None:
    """Random norms and biases (constant at init), so a wrong mapping of any of them shows."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.lower():
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.2, 0.2)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)


def _copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)


def _st_embedder(folder: Path) -> Callable:
    def embed(texts: list[str]) -> np.ndarray:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)

    return embed


def _cross_encoder(folder: Path) -> Callable:
    def score(query: str, documents: list[str]) -> np.ndarray:
        import torch
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(folder), device="cpu", local_files_only=True, activation_fn=torch.nn.Identity())
        return model.predict([(query, d) for d in documents], convert_to_numpy=True)

    return score


# --- the checkpoints ------------------------------------------------------------------------------

def build_bert(folder: Path, tokenizer_dir: Path, pooling: str = "cls") -> TinyEncoder:
    """BGE-style: BertModel, CLS pooling, normalized (pooling "mean": E5 / MiniLM style)."""
    import torch
    import transformers

    torch.manual_seed(50)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), max_position_embeddings=128,
                                                           type_vocab_size=2, **SMALL_ENCODER)).eval()
    _scramble(model, 50)
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    write_st_modules(folder, pooling)
    return TinyEncoder(folder, "embedding", _st_embedder(folder))


def _segment_blind(folder: Path) -> Callable:
    """The cross-encoder's logits with every token in segment 0: llama.cpp reads no token type ids
    (llama-server neither), so a BERT cross-encoder trained with segment B = 1 scores its pairs as if
    both texts were segment A. This is what llama.cpp computes; sentence-transformers' own scores
    differ by the second row of token_type_embeddings (see the test)."""
    def score(query: str, documents: list[str]) -> np.ndarray:
        import torch
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        out = []
        for doc in documents:
            batch = tok(query, doc, return_tensors="pt")
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
            with torch.no_grad():
                out.append(model(**batch).logits[0, 0].item())
        return np.array(out)

    return score


def build_bert_reranker(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """A ms-marco-MiniLM-style cross-encoder: BertForSequenceClassification with one label; its
    reference sees every token in segment 0, as llama.cpp does (`_segment_blind`)."""
    import torch
    import transformers

    torch.manual_seed(51)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(tok), max_position_embeddings=128, type_vocab_size=2, num_labels=1, **SMALL_ENCODER)).eval()
    _scramble(model, 51)
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return TinyEncoder(folder, "rerank", _segment_blind(folder))


def _xlm_config(tok, **extra):
    import transformers

    return transformers.XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=130, type_vocab_size=1,
                                         pad_token_id=1, bos_token_id=0, eos_token_id=2, **SMALL_ENCODER, **extra)


def build_xlm_roberta(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """multilingual-e5-style: XLMRobertaModel, mean pooling, normalized."""
    import torch
    import transformers

    torch.manual_seed(52)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.XLMRobertaModel(_xlm_config(tok)).eval()
    _scramble(model, 52)
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    write_st_modules(folder, "mean")
    return TinyEncoder(folder, "embedding", _st_embedder(folder))


def build_xlm_roberta_reranker(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """bge-reranker-v2-m3-style: XLMRobertaForSequenceClassification with one label."""
    import torch
    import transformers

    torch.manual_seed(53)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.XLMRobertaForSequenceClassification(_xlm_config(tok, num_labels=1)).eval()
    _scramble(model, 53)
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return TinyEncoder(folder, "rerank", _cross_encoder(folder))


def build_nomic_bert(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """nomic-embed-text-v1.5-style: the hub's NomicBertModel layout (GPT-2-style config keys, fused
    Wqkv, fc11/fc12/fc2, norm1/norm2), mean pooling; the vocabulary is whatever `tokenizer_dir` holds
    (WordPiece, or a tokenizer.json Unigram). The weights come from transformers' own NomicBertModel
    (which reads the hub layout back), so sentence-transformers is the reference; the config also
    carries that class's keys with the same values (transformers would fill in its defaults)."""
    import torch
    import transformers

    torch.manual_seed(54)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    d, ff, n_layer, n_head = 64, 96, 2, 4
    native = transformers.NomicBertConfig(vocab_size=len(tok), hidden_size=d, num_hidden_layers=n_layer,
                                          num_attention_heads=n_head, intermediate_size=ff, type_vocab_size=2,
                                          pad_token_id=tok.pad_token_id, layer_norm_eps=1e-12,
                                          rope_parameters={"rope_theta": 1000.0, "rope_type": "default"},
                                          max_position_embeddings=2048, initializer_range=0.2)
    model = transformers.NomicBertModel(native).eval()
    _scramble(model, 54)
    hub = {}
    for name, value in model.state_dict().items():
        name = (name.replace("layers.", "encoder.layers.").replace("embeddings.LayerNorm", "emb_ln")
                .replace("self_attn.o_proj", "attn.out_proj").replace("mlp.up_proj", "mlp.fc11")
                .replace("mlp.gate_proj", "mlp.fc12").replace("mlp.down_proj", "mlp.fc2")
                .replace("post_attention_layernorm", "norm1").replace("post_mlp_layernorm", "norm2"))
        if ".self_attn.q_proj" in name:
            prefix = name.split(".self_attn.")[0]
            parts = [model.state_dict()[f"{prefix.replace('encoder.', '')}.self_attn.{k}_proj.weight"] for k in "qkv"]
            hub[f"{prefix}.attn.Wqkv.weight"] = torch.cat(parts)
        elif ".self_attn." not in name:
            hub[name] = value
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hub.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**native.to_diff_dict(), "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
              "n_embd": d, "n_head": n_head, "n_layer": n_layer, "n_inner": ff, "n_positions": 8192,
              "max_trained_positions": 2048, "activation_function": "swiglu", "causal": False,
              "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "prenorm": False,
              "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
              "rotary_emb_base": 1000, "layer_norm_epsilon": 1e-12, "type_vocab_size": 2}
    (folder / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(tokenizer_dir, folder)
    (folder / "sentencepiece.bpe.model").unlink(missing_ok=True)  # the Unigram variant: tokenizer.json only
    write_st_modules(folder, "mean")
    return TinyEncoder(folder, "embedding", _st_embedder(folder))


def build_qwen3_embedding(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """Qwen3-Embedding's layout: a bare Qwen3Model's tensors (no `model.` prefix, no lm_head) under
    the Qwen3ForCausalLM architecture, last-token pooling, normalized; the tokenizer appends
    <|endoftext|>."""
    import torch
    import transformers

    torch.manual_seed(55)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      initializer_range=0.2)
    model = transformers.Qwen3Model(config).eval()
    _scramble(model, 55)
    model.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["architectures"] = ["Qwen3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(data))
    _copy_tokenizer(tokenizer_dir, folder)
    write_st_modules(folder, "lasttoken")
    return TinyEncoder(folder, "embedding", _st_embedder(folder))


QWEN3_RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
                       "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                       "<|im_start|>user\n")
QWEN3_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANK_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def build_qwen3_reranker(folder: Path, tokenizer_dir: Path) -> TinyEncoder:
    """Qwen3-Reranker: a Qwen3ForCausalLM whose model card says so; its score is P("yes") after the
    model card's prompt (computed here as the card does, with transformers)."""
    import torch
    import transformers

    torch.manual_seed(56)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      initializer_range=0.2)
    model = transformers.Qwen3ForCausalLM(config).eval()
    _scramble(model, 56)
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Qwen3-Reranker-Tiny\n")
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")

    def score(query: str, documents: list[str]) -> np.ndarray:
        out = []
        for doc in documents:
            text = (QWEN3_RERANK_PREFIX + f"<Instruct>: {QWEN3_RERANK_TASK}\n<Query>: {query}\n<Document>: {doc}"
                    + QWEN3_RERANK_SUFFIX)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(ids).logits[0, -1]
            out.append(torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0].item())
        return np.array(out)

    return TinyEncoder(folder, "rerank", score)


# --- the catalogue ------------------------------------------------------------------------------------

# Where edge-llm's GGUF differs from llama.cpp's converter's on purpose.
BERT_POOLER = ("only in edge-llm's file", "BertForSequenceClassification scores the pooled [CLS] state (dense + "
               "tanh, llama.cpp's `cls` tensor); llama.cpp's converter drops the pooler, so its scores are not "
               "the model's")

EMBEDDING_FAMILIES = {
    "bert-bge": Family(lambda d, t: build_bert(d, t / "wordpiece"), "default"),
    "bert-reranker": Family(lambda d, t: build_bert_reranker(d, t / "wordpiece"), "default", {
        "tensor cls.weight": BERT_POOLER, "tensor cls.bias": BERT_POOLER}),
    "xlm-roberta-e5": Family(lambda d, t: build_xlm_roberta(d, t / "unigram"), "default"),
    "xlm-roberta-reranker": Family(lambda d, t: build_xlm_roberta_reranker(d, t / "unigram"), "default"),
    "nomic-bert": Family(lambda d, t: build_nomic_bert(d, t / "wordpiece"), "default"),
    "nomic-bert-unigram": Family(lambda d, t: build_nomic_bert(d, t / "unigram"), "default"),
    "qwen3-embedding": Family(lambda d, t: build_qwen3_embedding(d, t / "qwen3-embedding"), "qwen2"),
    "qwen3-reranker": Family(lambda d, t: build_qwen3_reranker(d, t / "qwen3-reranker"), "qwen2"),
}
