"""An Engine that writes a given answer, a few characters per token, through a real chat
template: the server, its parsers and the official clients are real; only the model's words are
chosen by the test. The bundled SmolLM2 never writes `</think>` or two tool calls, and a parser
must be tested on exactly those.

Stop strings and max_tokens behave as in the real engines (the same TextAssembler)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edge_llm.chat_format import JinjaChatFormatter
from edge_llm.engines.base import Delta, Usage
from edge_llm.engines.textstream import TextAssembler
from edge_llm.sampling import SamplingParams

# Qwen3's way of rendering tools and thinking, cut down: the prompt opens the thinking.
THINK_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CHARS_PER_TOKEN = 3


class ScriptedEngine:
    name = "scripted"
    model_name = "scripted"
    n_ctx = 4096

    def __init__(self, answer: str, template: str = THINK_TOOLS_TEMPLATE) -> None:
        self.answer = answer
        self.formatter = JinjaChatFormatter(template)
        self.prompts: list[str] = []  # every prompt seen, for tests to check the rendering

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None) -> str:
        prompt = self.formatter.render(messages, tools=tools)
        self.prompts.append(prompt)
        return prompt

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        n_prompt = len(prompt)
        for index in range(params.n):
            text = TextAssembler(params.stop, params.include_stop_str_in_output)
            pieces = [self.answer[i:i + CHARS_PER_TOKEN] for i in range(0, len(self.answer), CHARS_PER_TOKEN)]
            generated = 0
            for k, piece in enumerate(pieces):
                await asyncio.sleep(0)
                generated += 1
                out = text.push(piece.encode())
                reason = "stop" if text.stopped else None
                if reason is None and params.max_tokens is not None and generated >= params.max_tokens:
                    reason = "length"
                if reason is None and k == len(pieces) - 1:
                    reason = "stop"
                if reason is not None:
                    yield Delta(out + text.finish(), [1], index, finish_reason=reason,
                                usage=Usage(n_prompt, generated))
                    break
                yield Delta(out, [1], index)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]

    def close(self) -> None:
        pass
