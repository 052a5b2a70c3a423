"""Chat prompts: a conversation (list of messages) rendered to the text a model was trained on.

Three ways, in the order a model reference can ask for them:
  - the model's own template (GGUF metadata `tokenizer.chat_template`), untrusted, so it is
    rendered only in jinja2's ImmutableSandboxedEnvironment, as transformers does;
  - a built-in named format (chatml, llama2, llama3, ...), for files that carry no template;
  - llama.cpp-style raw prefixes (`--in-prefix` / `--in-suffix`), with no template at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_llm.errors import EdgeLLMError, InvalidParameterError

# Built-in templates, written to match each family's reference template for the common case
# (system / user / assistant turns, no tools).
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama2": (
        "{% if messages and messages[0].role == 'system' %}"
        "{% set sys = '<<SYS>>\n' + messages[0].content + '\n<</SYS>>\n\n' %}{% set msgs = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ (sys if loop.first else '') + m.content }}"
        " [/INST]{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{% if messages and messages[0].role == 'system' %}{% set sys = messages[0].content + '\n\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{{ bos_token }}{% for m in msgs %}{% if m.role == 'user' %}[INST] {{ (sys if loop.first else '') + m.content }}"
        " [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "baichuan2": (
        "{% for m in messages %}{% if m.role == 'user' %}<reserved_106>{{ m.content }}"
        "{% elif m.role == 'assistant' %}<reserved_107>{{ m.content }}{% else %}{{ m.content }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<reserved_107>{% endif %}"
    ),
    "internlm2": (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "chatglm3": (
        "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>\n {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    "yuan2": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}<eod>"
        "{% else %}{{ m.content }}<sep>{% endif %}{% endfor %}"
    ),
}
NAMED_TEMPLATES["qwen"] = NAMED_TEMPLATES["chatml"]


class ChatFormatter(Protocol):
    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str: ...


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # transformers' tojson keeps non-ASCII text as is; templates of Chinese models rely on that.
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise EdgeLLMError(f"chat template does not parse: {exc.message} (line {exc.lineno})") from None


@dataclass(frozen=True)
class JinjaChatFormatter:
    """A chat template (from a GGUF, or a named one) rendered in a sandbox."""

    template: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        compiled = _compile(self.template)
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        except jinja2.exceptions.SecurityError as exc:
            raise EdgeLLMError(f"chat template refused by the sandbox: {exc}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidParameterError(f"chat template failed on these messages: {exc}",
                                        param="messages") from None


@dataclass(frozen=True)
class PrefixChatFormatter:
    """llama.cpp interactive mode: user turns wrapped in raw `in_prefix` / `in_suffix` text.

    A system message is the initial prompt, as `-p`/`-f` text is in llama-cli; assistant text
    follows the suffix verbatim, then `assistant_suffix` (e.g. the end-of-turn marker).
    """

    in_prefix: str = ""
    in_suffix: str = ""
    assistant_suffix: str = ""

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        parts = []
        for message in messages:
            if message["role"] == "user":
                parts.append(self.in_prefix + message["content"] + self.in_suffix)
            elif message["role"] == "assistant":
                parts.append(message["content"] + self.assistant_suffix)
            else:
                parts.append(message["content"])
        return "".join(parts)


def _check_messages(messages: list[dict[str, Any]]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidParameterError(f"messages[{i}] needs a 'role'", param=f"messages.{i}")
        if not isinstance(message.get("content", ""), str):
            raise InvalidParameterError(f"messages[{i}].content must be text", param=f"messages.{i}.content")


def named_formatter(name: str, bos_token: str = "", eos_token: str = "") -> JinjaChatFormatter:
    try:
        return JinjaChatFormatter(NAMED_TEMPLATES[name], bos_token, eos_token)
    except KeyError:
        known = ", ".join(sorted(NAMED_TEMPLATES))
        raise EdgeLLMError(f"unknown chat format {name!r}; known: {known}, or 'auto'") from None


def unescape(text: str) -> str:
    """Interpret \\n, \\t, \\\\ ... in flag values, as llama.cpp does for --in-prefix/--in-suffix."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def select_formatter(*, gguf_template: str | None, chat_format: str = "auto", bos_token: str = "",
                     eos_token: str = "", in_prefix: str | None = None,
                     in_suffix: str | None = None) -> ChatFormatter:
    """The formatter a model should use: raw prefixes if given, else a named format, else the
    GGUF's own template, else ChatML (the most common format among open chat models)."""
    if in_prefix is not None or in_suffix is not None:
        return PrefixChatFormatter(in_prefix or "", in_suffix or "")
    if chat_format and chat_format != "auto":
        return named_formatter(chat_format, bos_token, eos_token)
    if gguf_template:
        return JinjaChatFormatter(gguf_template, bos_token, eos_token)
    return named_formatter("chatml", bos_token, eos_token)
