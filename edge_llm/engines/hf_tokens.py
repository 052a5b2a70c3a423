"""Token ids -> bytes for Hugging Face tokenizers, so the shared TextAssembler can stream them.

HF tokenizers decode whole sequences; streaming needs each token's own bytes, so that a
character split over two tokens (Chinese, emoji) is held back instead of shown as U+FFFD.
Two vocabulary styles cover the open chat models:
  - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each character of a token string stands for
    one byte, through GPT-2's printable byte alphabet;
  - SentencePiece (Llama 2, Mistral, Baichuan): `▁` is a space and `<0xAB>` is a raw byte.
Any other tokenizer falls back to decoding the token alone.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_llm.chat_tokens import ControlToken
from edge_llm.engines.base import Engine
from edge_llm.errors import EdgeLLMError, ModelLoadError
from edge_llm.registry import ResolvedModel


def needs_remote_code(path: Path) -> str | None:
    """The file that asks for custom Python code (an `auto_map`), or None."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                return name
    return None


def checkpoint_folder(model: ResolvedModel, engine: str, gguf_hint: str, remote_hint: str = "") -> Path:
    """The HF checkpoint folder an engine may load: not a GGUF file, and no custom Python code
    (edge-llm never runs trust_remote_code)."""
    if model.is_gguf:
        raise EdgeLLMError(f"{model.path} is a GGUF file; the {engine} engine reads HF checkpoint folders {gguf_hint}")
    path = Path(model.path)
    if (remote := needs_remote_code(path)) is not None:
        raise ModelLoadError(f"{path}: {remote} asks for the model's own Python code (auto_map); edge-llm never runs "
                             f"trust_remote_code. {remote_hint}".rstrip())
    return path


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    text = repr(decoder)
    return {kind for kind in ("ByteLevel", "ByteFallback", "Metaspace", "Replace") if kind in text}


class TokenBytes:
    """Bytes of single tokens of one tokenizer; special tokens render as nothing (as in llama.cpp)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self._byte_level = "ByteLevel" in kinds
        self._sentencepiece = bool(kinds & {"ByteFallback", "Metaspace", "Replace"}) and not self._byte_level
        self._special = set(tokenizer.all_special_ids)
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                self._special.add(int(token_id))
        self._cache: dict[int, bytes] = {}

    def is_special(self, token: int) -> bool:
        return token in self._special

    def piece(self, token: int) -> bytes:
        cached = self._cache.get(token)
        if cached is None:
            cached = b"" if token in self._special else self._piece(token)
            self._cache[token] = cached
        return cached

    def _piece(self, token: int) -> bytes:
        text = self._tokenizer.convert_ids_to_tokens(token)
        if text is None:
            return b""
        if self._byte_level:
            alphabet = byte_level_alphabet()
            if all(ch in alphabet for ch in text):
                return bytes(alphabet[ch] for ch in text)
            return text.encode("utf-8")  # an added (non byte-level) token
        if self._sentencepiece:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                try:
                    return bytes([int(text[3:5], 16)])
                except ValueError:
                    pass
            return text.replace("\u2581", " ").encode("utf-8")
        return self._tokenizer.decode([token], skip_special_tokens=True).encode("utf-8")


class HFVocabulary(Engine):
    """Tokenizer-side methods shared by the engines that run HF checkpoints (transformers,
    vLLM, LMDeploy): the same token ids, streaming bytes and chat rendering for all of them."""

    tokenizer: Any
    n_vocab: int
    formatter: Any
    chat_template: str | None

    def init_vocabulary(self, tokenizer: Any, n_vocab: int, model: Any, options: Any) -> None:
        from edge_llm.chat_format import select_formatter

        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._pieces = TokenBytes(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        self.chat_template = template if isinstance(template, str) else None
        self.formatter = select_formatter(
            gguf_template=self.chat_template, chat_format=options.chat_format,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
            in_prefix=options.in_prefix, in_suffix=options.in_suffix,
        )
        self.trust_content_markup = bool(options.trust_content_markup)

    # -- vocabulary -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Text to token ids; BOS only where the tokenizer adds it and the text lacks it."""
        bos = self.tokenizer.bos_token
        if add_bos is None:
            add_bos = not (special and bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_bos, split_special_tokens=not special)["input_ids"])

    def control_token_list(self) -> list[ControlToken]:
        # The added tokens marked special: split_special_tokens leaves exactly these as text.
        # (Added tokens not marked special, like Qwen3's <think>, are cut out either way.)
        out = []
        for added in getattr(self.tokenizer, "added_tokens_decoder", {}).values():
            if getattr(added, "special", False):
                out.append(ControlToken(str(added.content), bool(getattr(added, "lstrip", False)),
                                        bool(getattr(added, "rstrip", False))))
        return out

    def token_piece(self, token: int) -> bytes:
        return self._pieces.piece(token)

    def token_text(self, token: int) -> str:
        if self._pieces.is_special(token):
            return self.tokenizer.convert_ids_to_tokens(token) or ""
        return self._pieces.piece(token).decode("utf-8", errors="replace")


def load_hf_tokenizer(path: Any, extra: str) -> Any:
    """An HF checkpoint's tokenizer, from local files only and never with custom code."""
    from edge_llm.errors import MissingExtraError, ModelLoadError

    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise MissingExtraError(exc.name or "transformers", extra) from None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        text = str(exc).strip()
        raise ModelLoadError(f"cannot load the tokenizer of {path}: "
                             f"{text.splitlines()[0] if text else type(exc).__name__}") from None
