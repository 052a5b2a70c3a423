"""A chat conversation kept as the exact token sequence the engine has already evaluated.

The scheduler reuses the longest common token prefix of a slot's cache, so a turn evaluates
only its new tokens if its prompt starts with exactly the previous prompt plus the tokens the
model generated. Re-rendering the chat template and re-tokenizing the answer text would not
guarantee that (a BPE tokenization is not unique), so each turn here extends the previous
token list instead:

    tokens(turn N+1) = tokens(turn N) + generated ids + tokenize(text between answer and new turn)

Two ways to build the text between turns:
  - TemplateConversation: the model's chat template; the "between" text is what the render of
    the conversation with the new user turn adds after the render of the conversation so far
    (for ChatML-style templates one is a prefix of the other). When it is not a prefix, the
    whole conversation is re-tokenized and the turn says so (`Prompt.rebuilt`).
  - PrefixConversation: llama.cpp's interactive mode: an initial prompt, then
    in_prefix + user text + in_suffix per turn, no template at all.

When the context cannot hold the next prompt plus room for an answer, the oldest turns are
dropped (the system prompt / initial prompt is kept) and the conversation is re-tokenized.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_llm.chat_tokens import chat_tokens
from edge_llm.engines.base import Engine
from edge_llm.engines.media import MEDIA_MARKER, MediaPrompt
from edge_llm.errors import ContextLengthError, EdgeLLMError
from edge_llm.files import json_bytes, os_errors, read_text

SAVE_FORMAT = "edge-llm-chat/1"


@dataclass
class Exchange:
    """One user turn and the model's answer. `user` is None for a continuation: the model went
    on from the conversation without a user turn (llama-cli `-i`, or an empty line)."""

    user: str | None
    answer: str = ""
    # The answer as generated (end-of-turn token included); None after /load, when only the
    # text is known and the answer must be tokenized again.
    answer_ids: list[int] | None = None
    images: list[Any] = field(default_factory=list)  # images.Image, before the user's text (REPL /image)


@dataclass
class Prompt:
    """The token sequence to send for one turn, and how it was built."""

    tokens: list[int]
    new_tokens: int  # tokens added to the conversation for this turn (the rest it already had)
    rebuilt: bool = False  # the whole conversation was tokenized again (no token-level extension)
    dropped: int = 0  # oldest exchanges dropped to make room in the context
    text: str = ""  # the rendered text of `tokens`, where known (template mode)
    user: str | None = None
    images: list[Any] = field(default_factory=list)  # this turn's images


@dataclass
class Answer:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Conversation(ABC):
    """State shared by both modes: the system prompt, the exchanges, save and load."""

    def __init__(self, engine: Engine, *, system: str | None = None, limit: int | None = None) -> None:
        self.engine = engine
        self.system = system or None
        self.exchanges: list[Exchange] = []
        # A slot's size: the prompt and the answer must fit in it.
        self.limit = limit or engine.n_ctx_seq
        self._eog_ids = engine.eog_ids
        self._images: list[Any] = []  # the images of the turn being built

    # -- editing --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the exchanges; keep the system prompt."""
        self.exchanges = []
        self._forget_tokens()

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self._forget_tokens()

    def messages(self, *, markers: bool = False) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages (`markers`: MEDIA_MARKER before a user text for
        each of its images, for the engine; saved files keep the text only)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for exchange in self.exchanges:
            if exchange.user is not None:
                images = MEDIA_MARKER * len(exchange.images) if markers else ""
                out.append({"role": "user", "content": images + exchange.user})
            out.append({"role": "assistant", "content": exchange.answer})
        return out

    # -- turns ----------------------------------------------------------------------------------

    def prompt(self, user: str | None, *, reserve: int = 0, images: list[Any] | None = None) -> Prompt:
        """The tokens for the next turn (`images`: this turn's, placed before its text). If the
        prompt plus `reserve` tokens of answer do not fit, the oldest exchanges are dropped until
        the prompt takes at most half the context. Raises ContextLengthError if even the system
        prompt and this turn alone do not fit."""
        before = list(self.exchanges)
        self._images = list(images or [])
        prompt = self._extend(user)
        dropped = 0
        # Once turns must go, drop down to half the context, as llama.cpp's context shift does:
        # dropping one turn at a time would re-evaluate the whole conversation on every turn.
        while self.exchanges and (len(prompt.tokens) + reserve > self.limit
                                  or dropped and len(prompt.tokens) > self.limit // 2):
            self.exchanges.pop(0)
            dropped += 1
            self._forget_tokens()
            prompt = self._extend(user)
        if len(prompt.tokens) >= self.limit:
            if dropped:  # this turn cannot fit at all: keep the conversation rather than lose it
                self.exchanges = before
                self._forget_tokens()
            raise ContextLengthError(
                f"this turn needs {len(prompt.tokens)} tokens but the context holds {self.limit}; "
                "shorten it, shorten the system prompt, or raise -c")
        prompt.dropped = dropped
        prompt.user = user
        prompt.images = self._images
        return prompt

    def record(self, prompt: Prompt, answer: Answer) -> str:
        """Add the exchange that `prompt` started and the model answered. Returns text the
        conversation added after the answer (llama-cli's injected reverse prompt), to show."""
        self.exchanges.append(Exchange(prompt.user, answer.text, list(answer.token_ids), list(prompt.images)))
        return self._advance(prompt, answer)

    @abstractmethod
    def _extend(self, user: str | None) -> Prompt: ...

    @abstractmethod
    def _advance(self, prompt: Prompt, answer: Answer) -> str: ...

    @abstractmethod
    def _forget_tokens(self) -> None: ...

    def _strip_eog(self, ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in self._eog_ids else list(ids)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path, *, model: str = "") -> None:
        data = {"format": SAVE_FORMAT, "model": model, "messages": self.messages()}
        target = Path(path).expanduser()
        tmp = target.with_name(target.name + ".tmp")
        try:
            with os_errors(path, "write"):
                tmp.write_bytes(json_bytes(data, indent=2) + b"\n")
                tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by `save` (or a bare list of messages)."""
        try:
            data = json.loads(read_text(Path(path).expanduser(), "conversation file"))
        except json.JSONDecodeError as exc:
            raise EdgeLLMError(f"{path} is not a JSON conversation: {exc}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        system, exchanges = parse_messages(messages, source=str(path))
        self.system = system
        self.exchanges = exchanges
        self._forget_tokens()


def parse_messages(messages: Any, *, source: str = "conversation") -> tuple[str | None, list[Exchange]]:
    """OpenAI-style messages -> (system prompt, exchanges). Users and assistants alternate; an
    assistant message with no user message before it is a continuation."""
    if not isinstance(messages, list):
        raise EdgeLLMError(f"{source}: expected a list of messages")
    system = None
    exchanges: list[Exchange] = []
    pending_user: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise EdgeLLMError(f"{source}: message {i} needs a 'role' and text 'content'")
        role, content = message.get("role"), message["content"]
        if role == "system" and i == 0:
            system = content or None
        elif role == "user" and pending_user is None:
            pending_user = content
        elif role == "assistant":
            exchanges.append(Exchange(pending_user, content))
            pending_user = None
        else:
            raise EdgeLLMError(f"{source}: message {i} ({role!r}) is out of order: expected a system message "
                               "first, then user and assistant messages in turn")
    if pending_user is not None:
        raise EdgeLLMError(f"{source}: the last user message has no answer")
    return system, exchanges


class TemplateConversation(Conversation):
    """A conversation rendered by the model's chat template (engine.chat_prompt)."""

    def __init__(self, engine: Engine, *, system: str | None = None, limit: int | None = None) -> None:
        super().__init__(engine, system=system, limit=limit)
        self._tokens: list[int] | None = None  # the conversation so far, as evaluated
        self._text = ""  # the rendered text that `_tokens` stands for

    def _forget_tokens(self) -> None:
        self._tokens = None
        self._text = ""

    def _extend(self, user: str | None) -> Prompt:
        if user is None:
            raise EdgeLLMError("a chat-template conversation needs a user message for each turn")
        images = [image for exchange in self.exchanges for image in exchange.images] + self._images
        if images:
            # With images the whole conversation goes through the projector's tokenizer each turn;
            # the slot still holds what the turns share (images are keyed by their content).
            chat = self.engine.chat_prompt(self.messages(markers=True) + [
                {"role": "user", "content": MEDIA_MARKER * len(self._images) + user}])
            tokens = self.engine.prompt_tokens(MediaPrompt(chat, images))
            return Prompt(tokens, len(tokens), text=chat.text)
        chat = self.engine.chat_prompt(self.messages() + [{"role": "user", "content": user}])
        text = chat.text
        # Content is text (chat_tokens.py): the tail is tokenized by the same rule as a whole prompt.
        if self._tokens is not None and text.startswith(self._text) and not chat.cuts_markup(len(self._text)):
            tail = chat_tokens(self.engine, chat, start=len(self._text))
            return Prompt(self._tokens + tail, len(tail), text=text)
        tokens = chat_tokens(self.engine, chat)
        return Prompt(tokens, len(tokens), rebuilt=self._tokens is not None or bool(self.exchanges), text=text)

    def _advance(self, prompt: Prompt, answer: Answer) -> str:
        # The sampled end-of-turn token stays out: the template writes its own end-of-turn text
        # after the answer, which tokenizes to that token when the two agree.
        body = self._strip_eog(answer.token_ids)
        if self.engine.detokenize(body) == answer.text:
            self._tokens = prompt.tokens + body
            self._text = prompt.text + answer.text
        else:  # a stop string cut the text, or a character was cut off: the ids do not match it
            self._forget_tokens()
        return ""


class PrefixConversation(Conversation):
    """llama.cpp interactive mode: initial prompt (the "system" text, from -f / -p), then
    in_prefix + user text + in_suffix for each turn, the answer's tokens as generated.

    As in llama-cli, the prefix and suffix are tokenized with special tokens parsed and the
    user's text without (typing "<|im_end|>" does not end a turn), and the end-of-turn token
    the model generated stays in the context."""

    def __init__(self, engine: Engine, *, system: str | None = None, limit: int | None = None,
                 in_prefix: str = "", in_suffix: str = "", eog_injection: str = "") -> None:
        super().__init__(engine, system=system, limit=limit)
        self.in_prefix = in_prefix
        self.in_suffix = in_suffix
        # llama-cli injects the first reverse prompt when the model ends its turn with EOG, so the
        # conversation shows the "User:" the model would otherwise have written.
        self.eog_injection = eog_injection
        self._tokens: list[int] | None = None

    def _forget_tokens(self) -> None:
        self._tokens = None

    def user_tokens(self, user: str | None) -> list[int]:
        if user is None:
            return []
        tokenize = self.engine.tokenize
        return (tokenize(self.in_prefix, special=True, add_bos=False)
                + tokenize(user, special=False, add_bos=False)
                + tokenize(self.in_suffix, special=True, add_bos=False))

    def answer_tokens(self, exchange: Exchange) -> list[int]:
        if exchange.answer_ids is not None:
            return exchange.answer_ids
        return self.engine.tokenize(exchange.answer, special=False, add_bos=False)

    def injection_tokens(self, answer: Answer) -> list[int]:
        """The reverse prompt appended after an answer that ended with end-of-generation."""
        ended = answer.finish_reason == "stop" and answer.token_ids and answer.token_ids[-1] in self._eog_ids
        if not (self.eog_injection and ended):
            return []
        return self.engine.tokenize(self.eog_injection, special=True, add_bos=False)

    def _initial_tokens(self) -> list[int]:
        return self.engine.tokenize(self.system or "")

    def _extend(self, user: str | None) -> Prompt:
        if self._images:
            raise EdgeLLMError("images need a chat template: not with --in-prefix / -p prompts")
        fresh = self._tokens is None
        if fresh:
            self._tokens = self._initial_tokens()
            for exchange in self.exchanges:
                self._tokens += self.user_tokens(exchange.user) + self.answer_tokens(exchange)
        added = self.user_tokens(user)
        new_tokens = len(self._tokens) + len(added) if fresh else len(added)
        return Prompt(self._tokens + added, new_tokens, rebuilt=fresh and bool(self.exchanges))

    def _advance(self, prompt: Prompt, answer: Answer) -> str:
        injected = self.injection_tokens(answer)
        self.exchanges[-1].answer_ids = list(answer.token_ids) + injected
        self._tokens = prompt.tokens + list(answer.token_ids) + injected
        if not injected:
            return ""
        self.exchanges[-1].answer += self.eog_injection
        return self.eog_injection
