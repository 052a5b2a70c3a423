"""Chat prompts: a conversation (list of messages) rendered to the text a model was trained on.

Three ways, in the order a model reference can ask for them:
  - the model's own template (GGUF metadata `tokenizer.chat_template`), untrusted, so it is
    rendered only in jinja2's ImmutableSandboxedEnvironment, as transformers does, and in a
    child process bounded in time and memory (template_sandbox.py);
  - a built-in named format (chatml, llama2, llama3, ...), for files that carry no template;
  - llama.cpp-style raw prefixes (`--in-prefix` / `--in-suffix`), with no template at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import jinja2

from edge_llm.errors import ChatTemplateError, EdgeLLMError, InvalidParameterError
from edge_llm.template_sandbox import (
    TemplateRenderError,
    TemplateSandbox,
    render_context,
    sandbox_environment,
)

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
    # The Jinja template text (what the server reads to know whether tools and thinking are
    # supported); None for a formatter with no template.
    template: str | None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str: ...

    def close(self) -> None: ...


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return sandbox_environment().from_string(template)


@dataclass
class JinjaChatFormatter:
    """A chat template rendered in jinja2's sandbox: a model's own (untrusted, so in a child
    process bounded in time and memory) or one of ours (`trusted`, rendered in-process)."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    trusted: bool = False
    _sandbox: TemplateSandbox | None = field(default=None, init=False, repr=False, compare=False)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        try:
            if self.trusted:
                context = render_context({"messages": messages, "add_generation_prompt": add_generation_prompt,
                                          "tools": tools}, self.bos_token, self.eos_token)
                return _compile(self.template).render(**context)
            if self._sandbox is None:
                self._sandbox = TemplateSandbox(self.template, bos_token=self.bos_token, eos_token=self.eos_token)
            return self._sandbox.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        except TemplateRenderError as exc:
            raise _template_error(exc.kind, exc.message) from None
        except jinja2.TemplateSyntaxError as exc:
            raise _template_error("syntax", f"{exc.message} (line {exc.lineno})") from None
        except jinja2.exceptions.SecurityError as exc:
            raise _template_error("security", str(exc)) from None
        except jinja2.TemplateError as exc:
            raise _template_error("failed", str(exc)) from None

    def close(self) -> None:
        """Stop the sandbox process, if one was started (a later render starts a new one)."""
        if self._sandbox is not None:
            self._sandbox.close()


def _template_error(kind: str, message: str) -> ChatTemplateError:
    if kind == "syntax":
        return ChatTemplateError(f"the chat template does not parse: {message}")
    if kind == "security":
        return ChatTemplateError(f"the chat template was refused by the sandbox: {message}")
    if kind == "too_expensive":
        return ChatTemplateError(f"the chat template is too expensive to render for these messages: {message}",
                                 param="messages")
    if kind == "crashed":
        return ChatTemplateError(f"the chat template is broken: {message}", param="messages")
    return ChatTemplateError(f"the chat template failed on these messages: {message}", param="messages")


@dataclass(frozen=True)
class PrefixChatFormatter:
    """llama.cpp interactive mode: user turns wrapped in raw `in_prefix` / `in_suffix` text.

    A system message is the initial prompt, as `-p`/`-f` text is in llama-cli; assistant text
    follows the suffix verbatim, then `assistant_suffix` (e.g. the end-of-turn marker).
    """

    in_prefix: str = ""
    in_suffix: str = ""
    assistant_suffix: str = ""
    template: None = None

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

    def close(self) -> None:
        pass


def _check_messages(messages: list[dict[str, Any]]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidParameterError(f"messages[{i}] needs a 'role'", param=f"messages.{i}")
        if not isinstance(message.get("content", ""), str):
            raise InvalidParameterError(f"messages[{i}].content must be text", param=f"messages.{i}.content")


def check_chat_format(name: str | None) -> None:
    """A --chat-format value: 'auto' (the model's own template) or a built-in name."""
    if name and name != "auto" and name not in NAMED_TEMPLATES:
        known = ", ".join(sorted(NAMED_TEMPLATES))
        raise EdgeLLMError(f"unknown chat format {name!r}; known: {known}, or 'auto'")


def named_formatter(name: str, bos_token: str = "", eos_token: str = "") -> JinjaChatFormatter:
    check_chat_format(name)
    return JinjaChatFormatter(NAMED_TEMPLATES[name], bos_token, eos_token, trusted=True)


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
