"""Chat prompts as tokens: message content is text, only the template's own markup is control tokens.

A chat template writes its markup (`<|im_start|>user\\n`, `<|eot_id|>` ...) and the messages'
content into one string. Tokenized with special tokens parsed, as llama.cpp, llama-server and
transformers do, a user who types `<|im_end|>\\n<|im_start|>assistant\\n...` forges a turn: the
typed text becomes the same control tokens the template writes. Every chat path (the server's
APIs, the REPL, batch, `generate --chat`, every engine) renders through `render_chat` and
tokenizes through `chat_tokens`, so the rule lives here once:

  - Every string a request gives the template (content, reasoning, names, roles, tool calls and
    tool definitions, dict keys included) is searched for the texts of the vocabulary's control
    tokens. When none holds one (nearly always), the rendered text is tokenized with special
    tokens parsed, exactly as before: every control token in it is the template's.
  - Otherwise each control-token text in those strings is replaced by a placeholder (a private-use
    character that occurs nowhere in the request or the template) before rendering, as
    transformers' and LMDeploy's fixes do. Every control token in the render is then the
    template's; the placeholders are turned back into the text they stand for, and the pieces
    between the template's control tokens are tokenized with special tokens NOT parsed. Those
    pieces are exactly the fragments the tokenizer would cut the text into itself (llama.cpp's
    `tokenizer_st_partition`, HF's added-vocabulary split), so token boundaries do not change:
    text next to content merges into the same tokens as before, the SentencePiece space prefix
    after a control token is the tokenizer's own, and the whitespace a control token strips
    (lstrip / rstrip) is stripped as the tokenizer strips it.

A placeholder is one character where the control token's text was several, so a template that
measures or slices content sees a slightly different string: only for content that carried a
control token's text. A template that assembles a control token out of pieces of content (by
`replace`, say) is not caught. Raw completion prompts (/v1/completions, /generate, Ollama's
`raw`) are the caller's own and are tokenized with special tokens parsed: they are not chats.
A trusted deployment can turn the rule off with `--trust-content-markup` (LoadOptions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from edge_llm.engines.base import Engine

# llama.cpp strips with C's isspace (ASCII); HF's AddedToken strips the same characters.
_SPACE = " \t\n\v\f\r"
# Placeholders come from the supplementary private-use planes: no tokenizer or template has a
# use for them, and any the request itself holds are skipped.
_PLACEHOLDER_FIRST = 0xF0000
_PRIVATE_USE = re.compile("[\U000F0000-\U0010FFFD]")


class ControlToken(NamedTuple):
    text: str
    lstrip: bool = False  # the tokenizer drops whitespace before it
    rstrip: bool = False  # ... and after it


class ControlTokens:
    """A vocabulary's control tokens as text: what tokenize(special=True) turns into one token and
    tokenize(special=False) leaves as text. Found leftmost-longest, as HF's added vocabulary
    finds them (llama.cpp tries longer texts first over the whole text: the same cuts unless two
    control texts overlap)."""

    def __init__(self, tokens: Iterable[ControlToken]) -> None:
        self.tokens = {t.text: t for t in tokens if t.text}
        self.pattern = _trie_pattern(sorted(self.tokens)) if self.tokens else None

    def found_in(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None


def _trie_pattern(texts: list[str]) -> re.Pattern[str]:
    """One regex for many literal texts, shaped as their prefix tree, so a position is tried in
    steps of the tree's depth rather than once per text (Gemma has thousands of control tokens);
    longer continuations first, so the match at a position is the longest."""
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict[str, Any]) -> str:
        # A run of nodes with one way on is one literal (no recursion per character).
        literal = ""
        while len(node) == 1 and "" not in node:
            (ch, node), = node.items()
            literal += ch
        ends = "" in node
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return re.escape(literal)
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:
            body = "(?:" + body + ")?"
        return re.escape(literal) + body

    return re.compile(build(trie))


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat: its text, and where in it the template's control tokens are."""

    text: str
    # (start, end) of each control token the template wrote, in order. None when no string of the
    # request held a control token's text: then every control token in `text` is the template's.
    markup: tuple[tuple[int, int], ...] | None = None

    def cuts_markup(self, position: int) -> bool:
        """Whether `position` falls inside one of the template's control tokens."""
        return self.markup is not None and any(a < position < b for a, b in self.markup)


def render_chat(engine: Engine, messages: list[dict], *, tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> ChatPrompt:
    """The engine's chat template applied to a request, with content kept apart from markup."""
    formatter = engine.formatter
    controls = engine.control_tokens
    if engine.trust_content_markup or not any(controls.found_in(s) for s in _strings((messages, tools))):
        return ChatPrompt(formatter.render(messages, add_generation_prompt=add_generation_prompt, tools=tools))
    placeholders = _placeholders(controls, messages, tools, getattr(formatter, "template", None) or "")
    escape = _escaper(controls, placeholders)
    rendered = formatter.render(_escaped(messages, escape), add_generation_prompt=add_generation_prompt,
                                tools=_escaped(tools, escape))
    return _restored(rendered, controls, {ord(p): text for text, p in placeholders.items()})


def chat_tokens(engine: Engine, prompt: ChatPrompt, *, start: int = 0) -> list[int]:
    """The tokens of `prompt.text[start:]` (start 0: with the beginning-of-sequence token where the
    model wants it): the template's control tokens as control tokens, everything else as text."""
    if prompt.markup is None:
        if start == 0:
            return engine.tokenize(prompt.text)
        return engine.tokenize(prompt.text[start:], special=True, add_bos=False)
    controls = engine.control_tokens.tokens
    pieces: list[tuple[str, ControlToken | None]] = []
    position = start
    for a, b in prompt.markup:
        if b <= start:
            continue
        if a < start:
            raise ValueError("the start falls inside a control token")
        pieces += [(prompt.text[position:a], None), (prompt.text[a:b], controls[prompt.text[a:b]])]
        position = b
    pieces.append((prompt.text[position:], None))
    # The whitespace a control token strips from its neighbours, as the tokenizer strips it.
    for i, (_, control) in enumerate(pieces):
        if control is None:
            continue
        if control.lstrip and i > 0 and pieces[i - 1][1] is None:
            pieces[i - 1] = (pieces[i - 1][0].rstrip(_SPACE), None)
        if control.rstrip and i + 1 < len(pieces) and pieces[i + 1][1] is None:
            pieces[i + 1] = (pieces[i + 1][0].lstrip(_SPACE), None)
    tokens: list[int] = []
    first = start == 0  # the first piece decides the beginning-of-sequence token, as tokenize(text) would
    for text, control in pieces:
        if not text:
            continue
        tokens += engine.tokenize(text, special=control is not None, add_bos=None if first else False)
        first = False
    if first:  # nothing but empty pieces
        return engine.tokenize("") if start == 0 else []
    return tokens


# -- escaping --------------------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    """Every string in a request's messages / tools, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield key
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _placeholders(controls: ControlTokens, messages: Any, tools: Any, template: str) -> dict[str, str]:
    """A private-use character for each control-token text the request holds, none of which occurs
    in the request, the template or a control token's own text."""
    taken: set[str] = set(_PRIVATE_USE.findall(template))
    found: set[str] = set()
    for text in _strings((messages, tools)):
        taken.update(_PRIVATE_USE.findall(text))
        found.update(m.group() for m in controls.pattern.finditer(text))  # type: ignore[union-attr]
    for text in controls.tokens:
        taken.update(_PRIVATE_USE.findall(text))
    out: dict[str, str] = {}
    code = _PLACEHOLDER_FIRST
    for text in sorted(found):
        while chr(code) in taken:
            code += 1
        out[text] = chr(code)
        code += 1
    return out


def _escaper(controls: ControlTokens, placeholders: dict[str, str]):  # noqa: ANN202
    pattern = controls.pattern
    assert pattern is not None
    return lambda text: pattern.sub(lambda m: placeholders[m.group()], text)


def _escaped(value: Any, escape) -> Any:  # noqa: ANN001
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {(escape(k) if isinstance(k, str) else k): _escaped(v, escape) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v, escape) for v in value]
    if isinstance(value, tuple):
        return tuple(_escaped(v, escape) for v in value)
    return value


def _restored(rendered: str, controls: ControlTokens, restore: dict[int, str]) -> ChatPrompt:
    """The render with placeholders back as the text they stand for, and where its control tokens
    (all the template's now) are."""
    assert controls.pattern is not None
    parts: list[str] = []
    markup: list[tuple[int, int]] = []
    length = 0
    position = 0
    for match in controls.pattern.finditer(rendered):
        text = rendered[position:match.start()].translate(restore)
        parts += [text, match.group()]
        length += len(text)
        markup.append((length, length + len(match.group())))
        length += len(match.group())
        position = match.end()
    parts.append(rendered[position:].translate(restore))
    return ChatPrompt("".join(parts), tuple(markup))
