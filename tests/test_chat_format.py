import os
import signal
import threading

import pytest

from edge_llm.chat_format import (
    NAMED_TEMPLATES,
    JinjaChatFormatter,
    PrefixChatFormatter,
    named_formatter,
    select_formatter,
    unescape,
)
from edge_llm.errors import ChatTemplateError, EdgeLLMError, InvalidParameterError
from edge_llm.template_sandbox import TemplateRenderError, TemplateSandbox

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好"},
]


def test_chatml_named_format():
    text = named_formatter("chatml").render(CONVERSATION)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_llama3_named_format():
    text = named_formatter("llama3", bos_token="<|begin_of_text|>").render(CONVERSATION[:2])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama2_named_format_puts_system_in_first_turn():
    text = named_formatter("llama2", bos_token="<s>", eos_token="</s>").render(CONVERSATION)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                    "<s>[INST] 你好 [/INST]")


def test_baichuan2_named_format():
    text = named_formatter("baichuan2").render(CONVERSATION)
    assert text == "Be brief.<reserved_106>Hi<reserved_107>Hello!<reserved_106>你好<reserved_107>"


def test_prefix_formatter_wraps_user_turns_only():
    fmt = PrefixChatFormatter("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n")
    text = fmt.render(CONVERSATION)
    assert text == ("Be brief.<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")


def test_unescape_interprets_backslash_sequences_and_keeps_unicode():
    assert unescape(r"<|im_start|>user\n") == "<|im_start|>user\n"
    assert unescape(r"用户\t") == "用户\t"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ x }}",
])
def test_sandbox_refuses_escapes(template):
    fmt = JinjaChatFormatter(template)
    with pytest.raises(EdgeLLMError):
        fmt.render([{"role": "user", "content": "hi"}])


def test_template_raise_exception_is_a_clear_error():
    fmt = JinjaChatFormatter("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidParameterError, match="roles must alternate"):
        fmt.render([{"role": "user", "content": "hi"}])


def test_bad_messages_are_refused():
    with pytest.raises(InvalidParameterError, match="needs a 'role'"):
        named_formatter("chatml").render([{"content": "hi"}])
    with pytest.raises(InvalidParameterError, match="must be text"):
        named_formatter("chatml").render([{"role": "user", "content": 3}])


def test_select_formatter_precedence():
    assert isinstance(select_formatter(gguf_template="x", in_prefix="a"), PrefixChatFormatter)
    assert select_formatter(gguf_template="T", chat_format="llama3").template.startswith("{{ bos_token }}")
    assert select_formatter(gguf_template="T").template == "T"
    with pytest.raises(EdgeLLMError, match="unknown chat format"):
        select_formatter(gguf_template=None, chat_format="nope")


# -- untrusted templates are bounded in time and memory (template_sandbox.py) --------------------------

# A render that never ends would hang the test: each hostile render runs in a thread that must end.
HANG_SECONDS = 60
EXPENSIVE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "huge range": "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "ten gigabytes": "{{ 'a' * 10**10 }}",
    "huge output": "{% for i in range(1000) %}{{ 'a' * 100000 }}{% endfor %}",
    "format width": "{{ '%0*d' % (10**9, 1) }}",
}


def render_or_hang(formatter, messages=None):
    outcome = {}

    def work():
        try:
            outcome["text"] = formatter.render(messages or [{"role": "user", "content": "hi"}])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert not thread.is_alive(), "the render never ended"
    return outcome


@pytest.mark.slow  # each waits out the sandbox's time limit
@pytest.mark.parametrize("name", list(EXPENSIVE_TEMPLATES))
def test_expensive_templates_fail_with_a_clear_400(name):
    formatter = JinjaChatFormatter(EXPENSIVE_TEMPLATES[name])
    try:
        outcome = render_or_hang(formatter)
    finally:
        formatter.close()
    error = outcome.get("error")
    assert isinstance(error, ChatTemplateError), outcome
    assert error.status == 400 and "too expensive" in error.message, error.message


def test_template_errors_of_python_are_400s():
    for template in ("{{ 1 / 0 }}", "{{ messages[0].content + 1 }}", "{{ none + 1 }}"):
        formatter = JinjaChatFormatter(template)
        error = render_or_hang(formatter).get("error")
        formatter.close()
        assert isinstance(error, ChatTemplateError) and error.status == 400, (template, error)


def test_the_sandbox_renders_exactly_as_in_process():
    template = NAMED_TEMPLATES["llama2"] + "{{ tools | tojson }}{{ '\u4f60' }}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    sandboxed = JinjaChatFormatter(template, "<s>", "</s>")
    messages = CONVERSATION + [{"role": "user", "content": "lone \ud800 surrogate"}]
    try:
        assert sandboxed.render(messages, tools=tools) == \
            JinjaChatFormatter(template, "<s>", "</s>", trusted=True).render(messages, tools=tools)
    finally:
        sandboxed.close()


@pytest.mark.slow  # waits out the sandbox's time limit
def test_a_stuck_sandbox_process_is_killed_and_replaced():
    sandbox = TemplateSandbox("{{ messages[0].content }}", seconds=0.2)
    try:
        assert sandbox.render([{"role": "user", "content": "one"}]) == "one"
        os.kill(sandbox._proc.pid, signal.SIGSTOP)  # stuck where SIGALRM cannot reach it
        with pytest.raises(TemplateRenderError) as caught:
            sandbox.render([{"role": "user", "content": "two"}])
        assert caught.value.kind == "too_expensive"
        assert sandbox.render([{"role": "user", "content": "three"}]) == "three"
        os.kill(sandbox._proc.pid, signal.SIGKILL)  # died between two renders: restarted unseen
        sandbox._proc.wait()
        assert sandbox.render([{"role": "user", "content": "four"}]) == "four"
    finally:
        sandbox.close()


def test_named_formats_render_in_process():
    formatter = named_formatter("chatml")
    formatter.render(CONVERSATION)
    assert formatter.trusted and formatter._sandbox is None
