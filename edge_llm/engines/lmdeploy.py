"""The LMDeploy engine (extra `lmdeploy`): TurboMind (default) or LMDeploy's PyTorch engine.

TurboMind brings W4A16 (AWQ 4-bit weights, `--quantization awq` on a checkpoint made with
`lmdeploy lite auto_awq`), an int8 / int4 KV cache (`-ctk q8_0 -ctv q8_0` -> quant_policy 8,
`q4_0` -> 4) and tensor parallelism (`--tp`). Pick the PyTorch engine with
`--engine-arg backend=pytorch`.

LMDeploy has no `n > 1` and matches stop words only when they are single tokens, so edge-llm
runs n sessions (seeds seed, seed+1, ...) and finds stop strings itself with the shared
TextAssembler; everything else LMDeploy cannot do is refused before a request starts.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

from edge_llm.engines.base import Delta, TokenLogprob, Usage
from edge_llm.engines.hf_tokens import load_hf_tokenizer
from edge_llm.engines.loop_engine import LoopEngine, gpu_kv_cache
from edge_llm.engines.textstream import TextAssembler
from edge_llm.engines.transformers import EOG_TEXTS
from edge_llm.errors import (
    InvalidParameterError,
    MissingExtraError,
)
from edge_llm.load_options import LoadOptions
from edge_llm.registry import ResolvedModel
from edge_llm.sampling import SamplingParams

# llama.cpp's -ctk/-ctv names -> LMDeploy's quant_policy (0: the model's dtype).
KV_QUANT_POLICY = {"f16": 0, "bf16": 0, "q8_0": 8, "int8": 8, "q4_0": 4, "int4": 4}
_session_ids = itertools.count(1)


def _import_lmdeploy() -> tuple[Any, Any]:
    try:
        import lmdeploy
    except ModuleNotFoundError as exc:
        raise MissingExtraError(exc.name or "lmdeploy", "lmdeploy") from None
    try:
        from lmdeploy.serve.core.async_engine import AsyncEngine
    except ImportError:  # LMDeploy before the serve/core split
        from lmdeploy.serve.async_engine import AsyncEngine
    return lmdeploy, AsyncEngine


def backend_config(options: LoadOptions, n_ctx: int | None) -> tuple[str, dict[str, Any]]:
    """LoadOptions -> (backend name, TurbomindEngineConfig / PytorchEngineConfig keywords)."""
    policy = gpu_kv_cache(options, "LMDeploy", KV_QUANT_POLICY, splits_by="--tp")
    if options.pipeline_parallel_size != 1 or options.distributed_executor_backend:
        raise InvalidParameterError("--pp / --distributed-executor-backend are vLLM options", param="pipeline_parallel_size")
    extra = dict(options.extra)
    backend = extra.pop("backend", "turbomind")
    if backend not in ("turbomind", "pytorch"):
        raise InvalidParameterError(f"LMDeploy backend must be turbomind or pytorch, not {backend!r}", param="backend")
    config: dict[str, Any] = dict(tp=options.tensor_parallel_size, quant_policy=policy)
    if n_ctx:
        config["session_len"] = n_ctx
    if options.gpu_memory_utilization is not None:
        # LMDeploy's share of *free* GPU memory for the KV cache: the nearest equivalent.
        config["cache_max_entry_count"] = options.gpu_memory_utilization
    if options.quantization:
        if options.quantization not in ("awq", "gptq") or backend != "turbomind":
            raise InvalidParameterError("LMDeploy takes --quantization awq or gptq (W4A16, TurboMind)",
                                        param="quantization")
        config["model_format"] = options.quantization
    if options.dtype and options.dtype != "auto":
        config["dtype"] = options.dtype
    config.update(extra)
    return backend, config


def gen_config_kwargs(params: SamplingParams, eog_ids: list[int], seed: int | None) -> dict[str, Any]:
    """One choice's LMDeploy GenerationConfig keywords; refuses what LMDeploy cannot honour."""
    if params.presence_penalty or params.frequency_penalty:
        raise InvalidParameterError("LMDeploy has no presence/frequency penalty (use repetition_penalty)",
                                    param="presence_penalty")
    if params.greedy and params.repetition_penalty != 1.0:
        # LMDeploy resets the penalty to 1.0 for greedy decoding.
        raise InvalidParameterError("LMDeploy ignores repetition_penalty when temperature is 0",
                                    param="repetition_penalty")
    if params.grammar:
        raise InvalidParameterError("the LMDeploy engine takes no GBNF grammar; use llama.cpp or vLLM",
                                    param="grammar")
    if params.logit_bias:
        raise InvalidParameterError("the LMDeploy engine takes no logit_bias; use llama.cpp or vLLM",
                                    param="logit_bias")
    kwargs: dict[str, Any] = dict(
        n=1, max_new_tokens=params.max_tokens, do_sample=not params.greedy,
        temperature=params.temperature if not params.greedy else 1.0,
        top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, ignore_eos=params.ignore_eos,
        stop_token_ids=list(params.stop_token_ids) + ([] if params.ignore_eos else list(eog_ids)),
        skip_special_tokens=True, random_seed=seed,
    )
    if params.logprobs is not None:
        kwargs["logprobs"] = max(1, params.logprobs)
    return kwargs


class LMDeployEngine(LoopEngine):
    name = "lmdeploy"
    library = "LMDeploy"

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = (options or LoadOptions()).resolve(model.spec)
        path = self._open(model, options)
        backend, config = backend_config(options, options.n_ctx)
        lmdeploy, async_engine_class = _import_lmdeploy()
        self._lmdeploy = lmdeploy
        self.seed = options.seed
        self.tokenizer = load_hf_tokenizer(path, "lmdeploy")
        config_class = lmdeploy.TurbomindEngineConfig if backend == "turbomind" else lmdeploy.PytorchEngineConfig

        async def start() -> Any:
            return async_engine_class(str(path), backend=backend, backend_config=config_class(**config),
                                      trust_remote_code=False)

        self._start(start)
        self.n_ctx = int(self._engine.session_len)
        self.init_vocabulary(self.tokenizer, len(self.tokenizer), model, options)
        vocab = self.tokenizer.get_vocab()
        eos = self.tokenizer.eos_token_id
        self.eog_ids = frozenset({vocab[t] for t in EOG_TEXTS if t in vocab} | ({eos} if eos is not None else set()))

    def validate(self, tokens: list[int], params: SamplingParams) -> None:
        super().validate(tokens, params)
        gen_config_kwargs(params, sorted(self.eog_ids), None)  # refuses unsupported parameters up front

    # -- generation -----------------------------------------------------------------------------

    async def _choice(self, tokens: list[int], params: SamplingParams, index: int,
                      out: asyncio.Queue) -> None:
        base = self.seed if params.seed is None else params.seed
        seed = None if base is None else base + index
        gen_config = self._lmdeploy.GenerationConfig(**gen_config_kwargs(params, sorted(self.eog_ids), seed))
        text = TextAssembler(params.stop, params.include_stop_str_in_output)
        generated = 0
        finish = None
        session = next(_session_ids)
        async for piece in self._engine.generate(tokens, session, gen_config=gen_config, stream_response=True,
                                                 sequence_start=True, sequence_end=True, do_preprocess=False,
                                                 input_ids=tokens):
            ids = list(piece.token_ids or [])
            generated = max(generated + len(ids), int(piece.generate_token_len or 0))
            shown = text.push(self.detokenize_bytes(ids)) if ids else ""
            logprobs = self._logprobs(ids, piece.logprobs, params.logprobs) if params.logprobs is not None else None
            if text.stopped:
                finish = "stop"
            elif piece.finish_reason:
                finish = "length" if piece.finish_reason == "length" else "stop"
            if finish is not None:
                shown += text.finish()
                usage = Usage(prompt_tokens=len(tokens), completion_tokens=generated)
                await out.put(Delta(text=shown, token_ids=ids, index=index, logprobs=logprobs,
                                    finish_reason=finish, usage=usage))
                return  # leaving the generator early makes LMDeploy cancel the session
            if ids or shown:
                await out.put(Delta(text=shown, token_ids=ids, index=index, logprobs=logprobs))
        usage = Usage(prompt_tokens=len(tokens), completion_tokens=generated)
        await out.put(Delta(text=text.finish(), index=index, finish_reason="stop", usage=usage))

    async def _deltas(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        out: asyncio.Queue = asyncio.Queue()

        async def run(index: int) -> None:
            try:
                await self._choice(tokens, params, index, out)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # raised to the caller by the loop below
                await out.put(exc)

        tasks = [asyncio.ensure_future(run(i)) for i in range(params.n)]
        finished = 0
        try:
            while finished < params.n:
                item = await out.get()
                if isinstance(item, Exception):
                    raise item
                finished += item.finish_reason is not None
                yield item
        finally:
            for task in tasks:
                task.cancel()  # the client is gone or a choice failed: LMDeploy ends the sessions

    def _logprobs(self, ids: list[int], entries: Any, top_n: int) -> list[TokenLogprob] | None:
        if not entries:
            return None
        out = []
        for token, entry in zip(ids, entries, strict=False):
            ranked = sorted(entry.items(), key=lambda item: -item[1])
            top = [(self.token_text(int(t)), float(lp)) for t, lp in ranked[:top_n]]
            out.append(TokenLogprob(token, self.token_text(token), float(entry.get(token, float("nan"))), top))
        return out

    def _shut_down(self, engine: Any) -> None:
        engine.close()
