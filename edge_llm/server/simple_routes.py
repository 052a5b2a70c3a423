"""The simple JSON APIs of deployments people already script against, with their exact shapes:

- POST /generate   vLLM's legacy api_server: {"prompt", "n", "temperature", ..., "stream"} ->
                   {"text": [prompt + completion, ...]}; streamed as vLLM did, one JSON object
                   per step followed by a NUL byte, each holding the text so far.
- POST /inference  a mosec-style model service: {"prompt"} -> {"generated"}; the prompt is
                   continued as plain text (no chat template), `generated` is the completion only.
- POST /           the common FastAPI chat demo (ChatGLM's api.py): {"prompt", "history"} ->
                   {"response", "history", "status": 200, "time"}; a chat turn through the
                   model's chat template.

Each also takes an optional `model`; without it the server's first model answers.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.sampling import SamplingParams
from edge_llm.server import templates
from edge_llm.server.generation import (
    Generation,
    StreamResponse,
    capped_max_tokens,
    tokenize_prompt,
    until_disconnect,
)
from edge_llm.server.jsonio import dumps
from edge_llm.server.openai_routes import ERRORS, local_or_forward, server_state, sse_error
from edge_llm.server.schemas import (
    DemoChatRequest,
    DemoChatResponse,
    InferenceRequest,
    InferenceResponse,
    VLLMGenerateRequest,
    VLLMGenerateResponse,
)

# ChatGLM's api.py defaults, so a script that relied on them gets the same kind of answer.
DEMO_TOP_P = 0.7
DEMO_TEMPERATURE = 0.95

router = APIRouter(tags=["simple APIs"])


@router.post("/generate", response_model=VLLMGenerateResponse, responses=ERRORS)
async def vllm_generate(body: VLLMGenerateRequest, request: Request) -> Any:
    if body.use_beam_search:
        raise InvalidParameterError("beam search is not supported", param="use_beam_search")
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    lease, handed_over = held, False
    try:
        engine = lease.engine
        tokens = await asyncio.to_thread(tokenize_prompt, engine, body.prompt)
        params = SamplingParams.create(
            n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, seed=body.seed,
            max_tokens=capped_max_tokens(engine, len(tokens), body.max_tokens, param="prompt"))
        generation = Generation(engine, tokens, params, server_state(request).metrics.observer(name),
                                closing=server_state(request).closing)
        await until_disconnect(request, generation.start())
        if body.stream:
            response = StreamResponse(_vllm_stream(generation, body.prompt, params.n), media_type="application/json")

            async def cleanup() -> None:
                await generation.aclose()
                lease.release()

            response.cleanup = cleanup
            handed_over = True
            return response
        choices = await until_disconnect(request, generation.collect())
        return {"text": [body.prompt + c.text for c in choices]}
    finally:
        if not handed_over:
            lease.release()


async def _vllm_stream(generation: Generation, prompt: str, n: int):
    texts = [""] * n
    try:
        async for delta in generation.deltas():
            texts[delta.index] += delta.text
            yield (dumps({"text": [prompt + t for t in texts]}) + "\0").encode("utf-8")
    except EdgeLLMError as exc:
        yield (sse_error(exc) + "\0").encode("utf-8")


async def _complete(request: Request, model: str | None, prompt: str | list[dict], *, max_tokens: int | None,
                    param: str, **sampling: Any) -> str:
    """One non-streamed completion of a text prompt, or of chat messages through the template."""
    name, held = await local_or_forward(request, model)
    if isinstance(held, Response):
        raise _Forwarded(held)
    try:
        engine = held.engine
        if isinstance(prompt, list):
            prompt = await templates.chat_prompt(engine, prompt)
        tokens = await asyncio.to_thread(tokenize_prompt, engine, prompt)
        params = SamplingParams.create(max_tokens=capped_max_tokens(engine, len(tokens), max_tokens, param=param),
                                       **sampling)
        generation = Generation(engine, tokens, params, server_state(request).metrics.observer(name),
                                closing=server_state(request).closing)
        await until_disconnect(request, generation.start())
        return (await until_disconnect(request, generation.collect()))[0].text
    finally:
        held.release()


class _Forwarded(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


@router.post("/inference", response_model=InferenceResponse, responses=ERRORS)
async def mosec_inference(body: InferenceRequest, request: Request) -> Any:
    try:
        text = await _complete(request, body.model, body.prompt, max_tokens=body.max_tokens, param="prompt",
                               temperature=body.temperature)
    except _Forwarded as forwarded:
        return forwarded.response
    return {"generated": text}


@router.post("/", response_model=DemoChatResponse, responses=ERRORS)
async def demo_chat(body: DemoChatRequest, request: Request) -> Any:
    messages: list[dict] = []
    for query, answer in body.history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": body.prompt})
    max_tokens = None
    if body.max_length is not None:
        # max_length counts prompt and answer together, as in transformers' generate().
        max_tokens = body.max_length - await _prompt_length(request, body.model, messages)
        if max_tokens < 1:
            raise InvalidParameterError(f"max_length {body.max_length} leaves no room after the prompt",
                                        param="max_length")
    try:
        text = await _complete(request, body.model, messages, max_tokens=max_tokens, param="prompt",
                               top_p=DEMO_TOP_P if body.top_p is None else body.top_p,
                               temperature=DEMO_TEMPERATURE if body.temperature is None else body.temperature)
    except _Forwarded as forwarded:
        return forwarded.response
    return {"response": text, "history": [*body.history, [body.prompt, text]], "status": 200,
            "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}


async def _prompt_length(request: Request, model: str | None, messages: list[dict]) -> int:
    manager = server_state(request).manager
    name = manager.resolve_name(model)
    if manager.peer_url(name) is not None:
        return 0  # the peer applies max_length itself
    lease = await manager.acquire(name)
    try:
        prompt = await templates.chat_prompt(lease.engine, messages)
        return len(await asyncio.to_thread(tokenize_prompt, lease.engine, prompt))
    finally:
        lease.release()
