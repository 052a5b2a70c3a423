"""The vLLM engine (extra `vllm`): vLLM's AsyncLLMEngine behind edge-llm's Engine interface.

vLLM brings paged attention, continuous batching, tensor parallelism (`--tp`), pipeline
parallelism across nodes (`--pp`, with Ray: `--distributed-executor-backend ray`) and its
quantized kernels (`--quantization awq|gptq|fp8 ...`). edge-llm adds nothing of its own to
that: scale comes from vLLM. The loop, the checkpoint checks and the tokenizer: loop_engine.py.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_llm.engines.base import Delta, TokenLogprob, Usage
from edge_llm.engines.hf_tokens import load_hf_tokenizer
from edge_llm.engines.loop_engine import LoopEngine, gpu_kv_cache
from edge_llm.errors import (
    InvalidParameterError,
    MissingExtraError,
)
from edge_llm.load_options import LoadOptions
from edge_llm.registry import ResolvedModel
from edge_llm.sampling import SamplingParams

# -ctk/-ctv values vLLM's KV cache can take (fp8 variants); f16 means "the model's dtype".
KV_CACHE_DTYPES = {"f16": "auto", "bf16": "auto", "auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8_e4m3",
                   "fp8_e5m2": "fp8_e5m2"}
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
_request_ids = itertools.count()


def _import_vllm() -> Any:
    try:
        import vllm
    except ModuleNotFoundError as exc:
        raise MissingExtraError(exc.name or "vllm", "vllm") from None
    return vllm


def engine_args(path: Path, options: LoadOptions, n_ctx: int | None) -> dict[str, Any]:
    """LoadOptions -> vLLM's AsyncEngineArgs keywords; llama.cpp-only options are refused."""
    kv = gpu_kv_cache(options, "vLLM", KV_CACHE_DTYPES, splits_by="--tp/--pp")
    args: dict[str, Any] = dict(
        model=str(path), tokenizer=str(path), trust_remote_code=False,
        tensor_parallel_size=options.tensor_parallel_size, pipeline_parallel_size=options.pipeline_parallel_size,
        kv_cache_dtype=kv, seed=options.seed if options.seed is not None else 0,
    )
    if n_ctx:
        args["max_model_len"] = n_ctx
    if options.dtype:
        args["dtype"] = options.dtype
    if options.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.quantization:
        args["quantization"] = options.quantization
    if options.distributed_executor_backend:
        args["distributed_executor_backend"] = options.distributed_executor_backend
    args.update(options.extra)  # anything else AsyncEngineArgs takes, e.g. enforce_eager
    return args


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """edge-llm SamplingParams -> vLLM SamplingParams keywords (the names are vLLM's already)."""
    if (params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty) and \
            "penalty_last_n" in params.model_fields_set and params.penalty_last_n != -1:
        raise InvalidParameterError("vLLM applies penalties over the whole sequence; it cannot honour "
                                    f"penalty_last_n={params.penalty_last_n} (use -1)", param="penalty_last_n")
    kwargs: dict[str, Any] = dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        include_stop_str_in_output=params.include_stop_str_in_output, ignore_eos=params.ignore_eos,
        max_tokens=params.max_tokens, seed=params.seed, logprobs=params.logprobs,
    )
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    if params.greedy:  # vLLM's greedy: temperature 0; truncation settings do not matter then
        kwargs.update(top_p=1.0, top_k=-1, min_p=0.0)
    return kwargs


class VLLMEngine(LoopEngine):
    name = "vllm"
    library = "vLLM"
    context_flag = "--max-model-len"

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = (options or LoadOptions()).resolve(model.spec)
        path = self._open(model, options)
        args = engine_args(path, options, options.n_ctx)
        vllm = _import_vllm()
        self._vllm = vllm
        self.tokenizer = load_hf_tokenizer(path, "vllm")

        async def start() -> Any:
            return vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**args))

        self._start(start)
        model_config = self._engine.model_config
        self.n_ctx = int(model_config.max_model_len)
        self.init_vocabulary(self.tokenizer, int(model_config.get_vocab_size()), model, options)

    def _sampling_params(self, params: SamplingParams) -> Any:
        kwargs = vllm_sampling_kwargs(params)
        if params.grammar:
            from vllm.sampling_params import StructuredOutputsParams

            # xgrammar, vLLM's default backend, reads llama.cpp's GBNF.
            kwargs["structured_outputs"] = StructuredOutputsParams(grammar=params.grammar)
        try:
            return self._vllm.SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidParameterError(f"vLLM refused the sampling parameters: {exc}") from None

    # -- generation -----------------------------------------------------------------------------

    async def _deltas(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """vLLM's cumulative outputs turned into per-choice deltas; runs on the engine's loop."""
        request_id = f"edge-llm-{next(_request_ids)}"
        sent_tokens = [0] * params.n
        sent_text = [0] * params.n
        done = [False] * params.n
        stream = self._engine.generate({"prompt_token_ids": tokens}, self._sampling_params(params), request_id)
        try:
            async for output in stream:
                for completion in output.outputs:
                    i = completion.index
                    if done[i]:
                        continue
                    new_ids = list(completion.token_ids[sent_tokens[i]:])
                    logprobs = self._logprobs(completion, sent_tokens[i], params.logprobs) if params.logprobs is not None else None
                    text = completion.text[sent_text[i]:]
                    sent_tokens[i] += len(new_ids)
                    sent_text[i] = len(completion.text)
                    finish = FINISH_REASONS.get(completion.finish_reason or "", None)
                    if completion.finish_reason and finish is None:
                        finish = "stop"
                    usage = None
                    if finish is not None:
                        done[i] = True
                        usage = Usage(prompt_tokens=len(output.prompt_token_ids or tokens),
                                      completion_tokens=len(completion.token_ids),
                                      cached_tokens=int(output.num_cached_tokens or 0))
                    if new_ids or text or finish:
                        yield Delta(text=text, token_ids=new_ids, index=i, logprobs=logprobs,
                                    finish_reason=finish, usage=usage)
        finally:
            if not all(done):
                await self._engine.abort(request_id)

    def _logprobs(self, completion: Any, start: int, top_n: int) -> list[TokenLogprob] | None:
        """vLLM gives, per position, the top-n tokens by rank plus the sampled one if it is not
        among them."""
        if completion.logprobs is None:
            return None
        out = []
        for position in range(start, len(completion.token_ids)):
            token = completion.token_ids[position]
            entries = completion.logprobs[position]
            ranked = sorted(entries.items(), key=lambda item: item[1].rank or 0)
            top = [(self.token_text(t), float(lp.logprob)) for t, lp in ranked if (lp.rank or 0) <= top_n][:top_n]
            chosen = entries.get(token)
            out.append(TokenLogprob(token, self.token_text(token),
                                    float(chosen.logprob) if chosen is not None else float("nan"), top))
        return out

    def _shut_down(self, engine: Any) -> None:
        engine.shutdown()
