"""FakeEngine: the Engine interface with no model behind it, for server and REPL tests that run in
seconds. Everything around the model is real (the chat template in its sandbox, the server, its
parsers, the official clients); the model's words are the test's choice (`answer`).

- The vocabulary is byte-level: token 3 + b is the byte b, so tokenize / detokenize round-trip
  any text and a multi-byte character is split over tokens as with a real BPE vocabulary. Tokens
  0-2 are specials (`<s>`, `<|im_start|>`, `<|im_end|>`); `<|im_end|>` ends a generation.
- A choice is the answer's tokens then `<|im_end|>`; with ignore_eos the answer repeats until
  max_tokens. Stop strings, stop_token_ids, max_tokens and n behave as in the real engines (the
  same TextAssembler), and the finish reasons are theirs.
- `delay` (seconds per token) keeps a request running, for tests of disconnects and shutdown;
  `running` counts the requests in flight (a cancelled request must bring it back to 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator

from edge_llm.chat_format import NAMED_TEMPLATES, JinjaChatFormatter
from edge_llm.chat_tokens import ControlToken
from edge_llm.engines.base import Delta, Engine, TokenLogprob, Usage
from edge_llm.engines.textstream import TextAssembler
from edge_llm.errors import InvalidParameterError
from edge_llm.sampling import SamplingParams

SPECIALS = ("<s>", "<|im_start|>", "<|im_end|>")
BOS, EOG = 0, 2
BYTE0 = len(SPECIALS)  # token id of byte 0
EMBEDDING_SIZE = 8
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


class FakeEngine(Engine):
    name = "fake"
    n_vocab = BYTE0 + 256
    eog_ids = frozenset({EOG})

    def __init__(self, answer: str = "Hello! I am a fake model.", *, template: str = NAMED_TEMPLATES["chatml"],
                 n_ctx: int = 2048, n_parallel: int = 4, model_name: str = "fake", delay: float = 0.0) -> None:
        self.answer = answer
        self.formatter = JinjaChatFormatter(template)
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.model_name = model_name
        self.delay = delay
        self.prompts: list[list[int]] = []  # every prompt generated from, for tests to check
        self.params: list[SamplingParams] = []  # ... and the parameters it was generated with
        self.running = 0
        self._lock = threading.Lock()

    @property
    def n_ctx_seq(self) -> int:
        return self.n_ctx // self.n_parallel

    # -- vocabulary -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        tokens = [BOS] if add_bos else []
        i = 0
        while i < len(text):
            name = next((s for s in SPECIALS if special and text.startswith(s, i)), None)
            if name is not None:
                tokens.append(SPECIALS.index(name))
                i += len(name)
            else:
                tokens.extend(BYTE0 + b for b in text[i].encode("utf-8"))
                i += 1
        return tokens

    def control_token_list(self) -> list[ControlToken]:
        return [ControlToken(text) for text in SPECIALS]

    def token_piece(self, token: int) -> bytes:
        return b"" if token < BYTE0 else bytes([token - BYTE0])

    def token_text(self, token: int) -> str:
        if 0 <= token < BYTE0:
            return SPECIALS[token]
        return self.token_piece(token).decode("utf-8", errors="replace")

    # -- generation -------------------------------------------------------------------------------

    def validate(self, tokens: list[int], params: SamplingParams) -> None:
        super().validate(tokens, params)
        if params.n > self.n_parallel:  # as llama.cpp's scheduler: each choice takes a slot
            raise InvalidParameterError(f"n={params.n} exceeds the {self.n_parallel} parallel slots", param="n")
        self.prompts.append(tokens)
        self.params.append(params)

    def _deltas(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        answer = self.tokenize(self.answer, special=False)
        for index in range(params.n):
            text = TextAssembler(params.stop, params.include_stop_str_in_output)
            for generated in itertools.count(1):
                k = generated - 1
                token = answer[k % len(answer)] if params.ignore_eos or k < len(answer) else EOG
                out = "" if self.ends_text(token, params) else text.push(self.token_piece(token))
                logprobs = [self._logprob(token, params.logprobs)] if params.logprobs is not None else None
                reason = self.finish_reason(token, params, text, len(tokens), generated)
                if reason is not None:
                    yield Delta(out + text.finish(), [token], index, logprobs, reason, Usage(len(tokens), generated))
                    break
                yield Delta(out, [token], index, logprobs)

    def _logprob(self, token: int, top_n: int) -> TokenLogprob:
        top = [(self.token_text(t), math.log(0.5 / (r + 1))) for r, t in enumerate([token, EOG, BYTE0 + 32][:top_n])]
        return TokenLogprob(token, self.token_text(token), math.log(0.5), top)

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        with self._counted():
            for delta in self._deltas(tokens, params):
                time.sleep(self.delay)
                yield delta

    async def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        with self._counted():
            for delta in self._deltas(tokens, params):
                await asyncio.sleep(self.delay)
                yield delta

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1

    # -- embeddings -------------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """A byte histogram folded to EMBEDDING_SIZE, L2-normalised: equal texts, equal vectors."""
        out = []
        for text in texts:
            vector = [0.0] * EMBEDDING_SIZE
            for b in text.encode("utf-8"):
                vector[b % EMBEDDING_SIZE] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            out.append([v / norm for v in vector])
        return out

    def close(self) -> None:
        self.formatter.close()
