"""SamplingParams: the one validated set of generation parameters.

The names and ranges follow vLLM's SamplingParams, so values copied from an OpenAI- or
vLLM-style request mean the same thing here. Every front end (CLI, server, REPL, batch) builds
one of these and every engine reads it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edge_llm.errors import InvalidParameterError

# Above this many logprobs per token the response gets large for no use; OpenAI caps at 20.
MAX_LOGPROBS = 20
# logit_bias: OpenAI's range of a bias (-100 bans a token in practice, 100 all but forces it), and
# at most this many tokens (a banned-word list; each entry is a sampler entry checked every step).
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
# Stop strings and stop token ids are checked on the engine thread for every token: bounded, so
# one request cannot slow the others' streams (OpenAI allows 4 stop strings; clients use a few).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 8192  # all of a request's stop strings together
MAX_STOP_TOKEN_IDS = 256
# The parameters a model's registry entry may give defaults for (a model card's recommended
# settings, as an Ollama Modelfile's PARAMETER lines): below a request's or a flag's own values.
MODEL_DEFAULT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "penalty_last_n",
                        "presence_penalty", "frequency_penalty")


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: Annotated[int, Field(ge=1, le=16)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 0.8
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    top_k: int = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    # llama.cpp applies penalties over the last N tokens; -1 means the whole context.
    penalty_last_n: Annotated[int, Field(ge=-1)] = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # a set: looked up for every token
    include_stop_str_in_output: bool = False
    # A GBNF grammar (llama.cpp syntax) that constrains the output, e.g. from a JSON schema.
    # (Declared before ignore_eos, whose check reads it.)
    grammar: str | None = None
    ignore_eos: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 256
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # Added to the logits of these token ids before sampling (OpenAI's and llama-server's logit_bias).
    logit_bias: dict[int, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    # Speculative decoding: the most drafted tokens per step for this request, at most the engine's
    # --draft-max (0: none); None: the engine's.
    draft_max: Annotated[int, Field(ge=0, le=256)] | None = None

    @field_validator("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "penalty_last_n", "max_tokens", "seed", "logprobs", "draft_max",
                     mode="before")
    @classmethod
    def _a_number_not_a_bool(cls, value: Any) -> Any:
        # pydantic takes True as 1 here; a JSONL record's `"max_tokens": true` is a mistake, not 1.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true/false")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (disabled) or >= 1")
        return value

    @field_validator("ignore_eos")
    @classmethod
    def _eos_ends_a_grammar(cls, value: bool, info: ValidationInfo) -> bool:
        # A complete grammar allows only end-of-generation; with it masked nothing fits, and
        # llama.cpp's grammar sampler aborts the whole process on the token it then picks.
        if value and info.data.get("grammar"):
            raise ValueError("cannot be combined with a grammar (response_format, a forced tool call): "
                             "the output could never end")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(value)})")
        if sum(len(s) for s in value) > MAX_STOP_CHARS:
            raise ValueError(f"the stop strings may hold at most {MAX_STOP_CHARS} characters together")
        return tuple(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_of_token_ids(cls, value: Any) -> Any:
        # JSON object keys are strings: {"15043": -100} names token 15043, as OpenAI's API has it.
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("must be a map of token id to bias")
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"may bias at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        out = {}
        for key, bias in value.items():
            token = key if isinstance(key, int) and not isinstance(key, bool) else \
                int(key) if isinstance(key, str) and key.strip().isdigit() else None
            if token is None:
                raise ValueError(f"keys must be token ids (got {key!r})")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise ValueError(f"biases must be numbers (got {bias!r})")
            out[token] = float(bias)
        return out or None

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_as_set(cls, value: Any) -> Any:
        if value is None:
            return frozenset()
        if not isinstance(value, (list, tuple, set, frozenset)) or any(
                isinstance(t, bool) or not isinstance(t, int) for t in value):
            raise ValueError("must be a list of integer token ids")
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        if len(value) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids (got {len(value)})")
        return frozenset(value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, **values: Any) -> SamplingParams:
        """Build from keyword values, dropping None, raising InvalidParameterError on bad input."""
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _as_parameter_error(exc) from None

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with these changes; a field not given before stays "not given" (with_defaults
        may still fill it)."""
        return SamplingParams.create(**{**self.model_dump(include=self.model_fields_set), **changes})

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """Fields the caller did not give taken from `defaults` (a model's, already validated)."""
        unset = {name: value for name, value in defaults.items() if name not in self.model_fields_set}
        return self.model_copy(update=unset) if unset else self


def _as_parameter_error(exc: ValidationError) -> InvalidParameterError:
    """Turn pydantic's report into one line naming the parameter, its range and the bad value."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or "sampling"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        message = "is not a sampling parameter"
    got = first.get("input")
    return InvalidParameterError(f"invalid {param}: {message} (got {got!r})", param=param)
