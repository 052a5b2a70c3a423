import pytest

from edge_llm.chat_format import (
    JinjaChatFormatter,
    PrefixChatFormatter,
    named_formatter,
    select_formatter,
    unescape,
)
from edge_llm.errors import EdgeLLMError, InvalidParameterError

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
