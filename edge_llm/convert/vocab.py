"""Tokenizers into GGUF metadata: SentencePiece (`tokenizer.model`) and HF byte-level BPE
(`tokenizer.json`), with added/special tokens, merges and the chat template (gguf.SpecialVocab).

This follows llama.cpp's convert_hf_to_gguf.py (`_create_vocab_sentencepiece`, `get_vocab_base`,
`get_vocab_base_pre`) but reads tokenizer.json with the `tokenizers` library instead of
transformers, so no transformers (and no torch) is imported.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import gguf

from edge_llm.convert.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

# llama.cpp tells BPE pre-tokenizers apart by the sha256 of the token ids of this text
# (get_vocab_base_pre in convert_hf_to_gguf.py); it must stay byte-for-byte the same.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
          "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 "
          "33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2"
          "\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
          "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
          "I'll make it, 'D you like some tea? We'Ve a'lL")

# The hashes of llama.cpp's table for the families this converter supports (same values upstream).
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",  # OLMo2-8B-SuperBPE
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # o200k (Phi-4-mini)
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",  # glm-4-9b-chat
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
}

# When the hash is not in the table (a fine-tune with edited special tokens changes the ids), the
# split regex itself still says which pre-tokenizer llama.cpp must run.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE_REGEXES = {
    _LLAMA3_REGEX: "llama-bpe",
    _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
    _GPT4O_REGEX: "gpt-4o",  # o200k: Phi-4-mini, gpt-oss
}


def does_token_look_special(token: str) -> bool:
    """Added tokens some models forget to mark special (same rule as llama.cpp's converter)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None, prefer: str = "auto") -> str:
    """Write the checkpoint's tokenizer; returns its kind ("spm" or "bpe")."""
    has_spm = (hf_dir / "tokenizer.model").is_file()
    has_json = (hf_dir / "tokenizer.json").is_file()
    if prefer == "bpe" and has_json or not has_spm and has_json:
        add_bpe_vocab(writer, hf_dir, vocab_size)
        return "bpe"
    if has_spm:
        add_sentencepiece_vocab(writer, hf_dir, vocab_size)
        return "spm"
    raise CheckpointError(f"{hf_dir}: no tokenizer (tokenizer.model or tokenizer.json)")


def tokenizer_config(hf_dir: Path) -> dict:
    path = hf_dir / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None


class SpecialVocab(gguf.SpecialVocab):
    """gguf-py's SpecialVocab plus the BertNormalizer options of tokenizer.json (lowercase, strip
    accents), which llama.cpp's WPM tokenizer reads and newer gguf-py writes."""

    def _load(self, path: Path) -> None:
        super()._load(path)
        self.normalizer_options: dict[str, bool] = {}
        tokenizer_file = path / "tokenizer.json"
        if tokenizer_file.is_file():
            try:
                normalizer = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("normalizer") or {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                return
            self._parse_normalizer(normalizer)

    def _parse_normalizer(self, normalizer: dict) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.normalizer_options["lowercase"] = True
        elif kind == "StripAccents":
            self.normalizer_options["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key in ("lowercase", "strip_accents"):
                if key in normalizer:
                    if normalizer[key] is None:
                        self.normalizer_options.pop(key, None)
                    else:
                        self.normalizer_options[key] = bool(normalizer[key])
        elif kind == "Sequence":
            for step in normalizer.get("normalizers", []):
                self._parse_normalizer(step)

    def add_to_gguf(self, gw: gguf.GGUFWriter, quiet: bool = False) -> None:
        super().add_to_gguf(gw, quiet=quiet)
        for key, value in self.normalizer_options.items():
            gw.add_bool(f"tokenizer.ggml.normalizer.{key}", value)


def special_vocab(hf_dir: Path, n_vocab: int | None = None, **kwargs) -> gguf.SpecialVocab:
    """Special token ids, add_bos/add_eos and the chat template (gguf-py reads tokenizer_config.json,
    tokenizer.json, config.json and chat_template.jinja/.json). gguf-py's warnings about post-processor
    details llama.cpp does not use are not the user's concern: shown with -v only."""
    gguf_logger = logging.getLogger("gguf.vocab")
    level = gguf_logger.level
    if not logger.isEnabledFor(logging.INFO):
        gguf_logger.setLevel(logging.ERROR)
    try:
        return SpecialVocab(hf_dir, n_vocab=n_vocab, **kwargs)
    finally:
        gguf_logger.setLevel(level)


def load_sentencepiece(hf_dir: Path):
    return load_sentencepiece_file(hf_dir / "tokenizer.model")


def load_sentencepiece_file(path: Path):
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise CheckpointError("this checkpoint has a SentencePiece tokenizer: pip install sentencepiece") from None

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from None
    return sp


def sentencepiece_tokens(hf_dir: Path, vocab_size: int | None, added: str = "llama", fix_piece=None):
    """(tokens, scores, types) of a SentencePiece vocabulary with the checkpoint's added tokens.

    `added` is how llama.cpp's converter types the tokens of tokenizer_config.json's
    added_tokens_decoder: "llama" (most families: special, or looking special, is CONTROL; the
    others are USER_DEFINED with "\u2581" pre-normalized to a space) or "strict" (Phi-3, InternLM2:
    CONTROL only when marked special, text as is, and tokenizer.json's added tokens too)."""
    sp = load_sentencepiece(hf_dir)
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        piece = sp.IdToPiece(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
        tokens[i], scores[i] = piece.encode(), sp.GetScore(i)
        if fix_piece:
            tokens[i], types[i] = fix_piece(piece, types[i])

    added_file = hf_dir / "added_tokens.json"
    if added_file.is_file():
        for text, tid in json.loads(added_file.read_text(encoding="utf-8")).items():
            if isinstance(tid, int) and 0 <= tid < n:
                tokens[tid], scores[tid], types[tid] = text.encode(), -1000.0, gguf.TokenType.USER_DEFINED
    for tid, data in _added_token_entries(hf_dir, with_tokenizer_json=added == "strict"):
        text = data["content"]
        if not 0 <= tid < n:
            continue
        if added == "strict":
            types[tid] = gguf.TokenType.CONTROL if data.get("special") else gguf.TokenType.USER_DEFINED
        elif data.get("special") or does_token_look_special(text):
            types[tid] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[tid] = gguf.TokenType.USER_DEFINED
        tokens[tid], scores[tid] = text.encode(), -1000.0
    return tokens, scores, types, sp


def _added_token_entries(hf_dir: Path, with_tokenizer_json: bool) -> list[tuple[int, dict]]:
    entries = [(int(tid), data) for tid, data in tokenizer_config(hf_dir).get("added_tokens_decoder", {}).items()]
    if with_tokenizer_json and (hf_dir / "tokenizer.json").is_file():
        data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        entries += [(int(t["id"]), t) for t in data.get("added_tokens", [])]
    return entries


def added_tokens(hf_dir: Path) -> list[tuple[int, str]]:
    """(id, text) of the added tokens of tokenizer_config.json and tokenizer.json, in that order."""
    return [(tid, data["content"]) for tid, data in _added_token_entries(hf_dir, with_tokenizer_json=True)]


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None, *,
                            added: str = "llama", space_prefix: bool | str | None = None, fix_piece=None,
                            special: bool = True) -> int:
    """Write a SentencePiece vocabulary (`tokenizer.ggml.model` "llama"); returns its size.

    `space_prefix`: None writes `add_space_prefix` false only for a model trained without the dummy
    "\u2581" prefix (Baichuan2, InternLM2: llama.cpp would otherwise add a space its tokenizer does
    not); "model" writes the model's own setting either way; a bool writes that value.
    `special=False` leaves the special tokens to the caller."""
    tokens, scores, types, sp = sentencepiece_tokens(hf_dir, vocab_size, added, fix_piece)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    adds_prefix = sp.EncodeAsPieces("x")[0].startswith("\u2581")
    if space_prefix == "model" or space_prefix is None and not adds_prefix:
        space_prefix = adds_prefix
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if special:
        special_vocab(hf_dir, len(tokens)).add_to_gguf(writer, quiet=True)
    return len(tokens)


def bpe_pre_tokenizer(tokenizer, tokenizer_json: dict, regex_pre: dict[str, str] | None = None) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)."""
    digest = sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()
    if digest in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex")
        if step.get("type") == "Split" and regex in KNOWN_PRE_REGEXES:
            return (regex_pre or {}).get(KNOWN_PRE_REGEXES[regex], KNOWN_PRE_REGEXES[regex])
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise CheckpointError(f"unrecognized BPE pre-tokenizer (llama.cpp hash {digest}): llama.cpp could not "
                          "tokenize this model's text correctly, so it is not converted")


def load_tokenizer_json(hf_dir: Path):
    """(tokenizers.Tokenizer, the parsed tokenizer.json) of the checkpoint."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CheckpointError("this checkpoint has a tokenizer.json: pip install tokenizers") from None

    path = hf_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises bare Exception subclasses
        raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from None
    return tokenizer, data


def hf_vocab_tokens(hf_dir: Path, tokenizer, data: dict, vocab_size: int | None) -> tuple[list[str], list[int]]:
    """(tokens, types) of a tokenizer.json vocabulary, as llama.cpp's `get_vocab_base` lists them:
    every id up to vocab_size, added tokens CONTROL when special (or looking special), else
    USER_DEFINED with "\u2581" pre-normalized to a space; ids without a token are [PADn]."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n = vocab_size or (max(vocab.values()) + 1)
    if max(vocab.values()) >= n:
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: token id {max(vocab.values())} does not fit "
                              f"vocab_size {n} of config.json")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for tid, info in tokenizer_config(hf_dir).get("added_tokens_decoder", {}).items():
        added.setdefault(int(tid), {"content": info["content"], "special": info.get("special", False)})
    reverse = {tid: text for text, tid in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = added[i]["content"]
            if added[i].get("special") or does_token_look_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_bpe_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None, *, special: bool = True,
                  regex_pre: dict[str, str] | None = None) -> int:
    """Write a byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2") with its merges; returns its
    size. `regex_pre` renames what the split regex alone says, for a family whose own name llama.cpp
    treats differently (e.g. GLM-4's cl100k regex is "glm4", not "llama-bpe"), when the hash is
    unknown. `special=False` leaves the special tokens to the caller."""
    tokenizer, data = load_tokenizer_json(hf_dir)
    path = hf_dir / "tokenizer.json"
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(f"{path}: only byte-level BPE tokenizers (GPT-2 style) are supported from "
                              f"tokenizer.json; this one is {model.get('type')} with byte_fallback="
                              f"{model.get('byte_fallback')}")
    pre = bpe_pre_tokenizer(tokenizer, data, regex_pre or {})
    tokens, types = hf_vocab_tokens(hf_dir, tokenizer, data, vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if special:
        special_vocab(hf_dir, len(tokens), load_merges=True).add_to_gguf(writer, quiet=True)
    return len(tokens)


# --- encoder vocabularies (BERT's WordPiece, XLM-RoBERTa's SentencePiece unigram) ---------------------

def add_wordpiece_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None) -> int:
    """A BERT WordPiece vocabulary (`tokenizer.ggml.model` "bert") from tokenizer.json, as llama.cpp's
    BertModel.set_vocab writes it: tokens in the "phantom space" form its WPM tokenizer reads
    ("##x" -> "x", other normal tokens "\u2581x"; control tokens as they are). The pre-tokenizer
    name is the hash's when llama.cpp knows it; llama.cpp's WPM tokenizer does not read it."""
    tokenizer, data = load_tokenizer_json(hf_dir)
    if data.get("model", {}).get("type") != "WordPiece":
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: a BERT model needs a WordPiece tokenizer, this one "
                              f"is {data.get('model', {}).get('type')}")
    digest = sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()
    tokens, types = hf_vocab_tokens(hf_dir, tokenizer, data, vocab_size)

    def phantom(token: str, kind: int) -> str:
        if kind == gguf.TokenType.CONTROL:
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(KNOWN_PRE_HASHES.get(digest, "default"))
    writer.add_token_list([phantom(t, k) for t, k in zip(tokens, types, strict=True)])
    writer.add_token_types(types)
    special_vocab(hf_dir, len(tokens)).add_to_gguf(writer, quiet=True)
    return len(tokens)


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as ints, length-delimited as bytes
    (enough of the wire format to read a SentencePiece model's specs without protobuf)."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            yield number, data[i:i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def sentencepiece_specs(path: Path) -> dict:
    """model_type (1: unigram), add_dummy_prefix, remove_extra_whitespaces and precompiled_charsmap
    of a SentencePiece model file (sentencepiece_model.proto: trainer_spec 2, normalizer_spec 3)."""
    specs = {"model_type": 1, "add_dummy_prefix": True, "remove_extra_whitespaces": True,
             "precompiled_charsmap": b""}
    try:
        for number, value in _proto_fields(path.read_bytes()):
            if number == 2 and isinstance(value, bytes):
                for n, v in _proto_fields(value):
                    if n == 3:
                        specs["model_type"] = v
            elif number == 3 and isinstance(value, bytes):
                names = {2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}
                for n, v in _proto_fields(value):
                    if n in names:
                        specs[names[n]] = v if n == 2 else bool(v)
    except (IndexError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from None
    return specs


def _write_unigram(writer: gguf.GGUFWriter, hf_dir: Path, tokens: list[bytes], scores: list[float],
                   types: list[int], add_prefix: bool, remove_whitespaces: bool, charsmap: bytes,
                   token_type_count: int) -> None:
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_prefix)
    writer.add_token_type_count(token_type_count)
    writer.add_remove_extra_whitespaces(remove_whitespaces)
    if charsmap:
        writer.add_precompiled_charsmap(charsmap)
    special_vocab(hf_dir, len(tokens)).add_to_gguf(writer, quiet=True)


def add_unigram_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int | None, token_type_count: int) -> int:
    """XLM-RoBERTa's SentencePiece unigram vocabulary (`tokenizer.ggml.model` "t5", llama.cpp's UGM),
    as llama.cpp's `_xlmroberta_set_vocab` writes it: from `sentencepiece.bpe.model` with the
    fairseq ids (<s> <pad> </s> <unk> first, every piece one id later), else from tokenizer.json's
    Unigram model as it is."""
    spm_path = hf_dir / "sentencepiece.bpe.model"
    if spm_path.is_file():
        specs = sentencepiece_specs(spm_path)
        if specs["model_type"] != 1:
            raise CheckpointError(f"{spm_path}: an XLM-RoBERTa vocabulary must be a unigram model "
                                  f"(model_type {specs['model_type']})")
        sp = load_sentencepiece_file(spm_path)
        n = max(vocab_size or 0, sp.vocab_size())
        tokens = [f"[PAD{i}]".encode() for i in range(n)]
        scores = [-10000.0] * n
        types = [gguf.TokenType.UNUSED] * n
        for i in range(sp.vocab_size()):
            types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                        else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                        else gguf.TokenType.NORMAL)
            tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        # fairseq's ids, as the HF tokenizer has them (llama.cpp's converter drops the last entry)
        tokens = [b"<s>", b"<pad>", b"</s>", b"<unk>"] + tokens[3:-1]
        scores = [0.0, 0.0, 0.0, 0.0] + scores[3:-1]
        types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + types[3:-1]
        _write_unigram(writer, hf_dir, tokens, scores, types, specs["add_dummy_prefix"],
                       specs["remove_extra_whitespaces"], specs["precompiled_charsmap"], token_type_count)
        return len(tokens)

    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf_dir}: no sentencepiece.bpe.model or tokenizer.json")
    tokenizer, data = load_tokenizer_json(hf_dir)
    model = data.get("model", {})
    if model.get("type") != "Unigram":
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: expected a Unigram tokenizer, this one is "
                              f"{model.get('type')}")
    config = tokenizer_config(hf_dir)
    pieces = model.get("vocab", [])
    n_base = tokenizer.get_vocab_size(with_added_tokens=False)
    n = max(vocab_size or 0, n_base)
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    unk_id = added.get(config.get("unk_token"), model.get("unk_id", 3))
    special_ids = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for i in range(n_base):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            continue
        tokens[i], scores[i] = piece.encode(), float(pieces[i][1])
        types[i] = (gguf.TokenType.UNKNOWN if i == unk_id else gguf.TokenType.CONTROL if i in special_ids
                    else gguf.TokenType.USER_DEFINED if i in added.values() else gguf.TokenType.NORMAL)
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = next((base64.b64decode(s["precompiled_charsmap"]) for s in steps
                     if s.get("type") == "Precompiled" and s.get("precompiled_charsmap")), b"")
    _write_unigram(writer, hf_dir, tokens, scores, types, _adds_prefix_space(data, config),
                   bool(config.get("clean_up_tokenization_spaces", False)), charsmap, token_type_count)
    return len(tokens)


def _adds_prefix_space(data: dict, config: dict) -> bool:
    """Whether the tokenizer puts "\u2581" before the first word (its Metaspace pre-tokenizer)."""
    if config.get("add_prefix_space") is not None:
        return bool(config["add_prefix_space"])
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return True
