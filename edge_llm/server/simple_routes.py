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

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from edge_llm.engines.base import Engine
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.server.errors import stream_error
from edge_llm.server.generation import StreamResponse
from edge_llm.server.jsonio import dumps
from edge_llm.server.pipeline import Choice, Job, Run, TextPart, handle, with_engine
from edge_llm.server.schemas import (
    DOCUMENTED_ERRORS,
    DemoChatRequest,
    DemoChatResponse,
    InferenceRequest,
    InferenceResponse,
    VLLMGenerateRequest,
    VLLMGenerateResponse,
    sampling_fields,
)
from edge_llm.server.state import server_state

# ChatGLM's api.py defaults, so a script that relied on them gets the same kind of answer.
DEMO_TOP_P = 0.7
DEMO_TEMPERATURE = 0.95

router = APIRouter(tags=["simple APIs"])


@router.post("/generate", response_model=VLLMGenerateResponse, responses=DOCUMENTED_ERRORS)
async def vllm_generate(body: VLLMGenerateRequest, request: Request) -> Any:
    if body.use_beam_search:
        raise InvalidParameterError("beam search is not supported", param="use_beam_search")
    sampling = sampling_fields(body)

    def reply(run: Run, choices: list[Choice]) -> dict:
        return {"text": [body.prompt + c.content for c in choices]}

    def stream_reply(run: Run) -> Response:
        return StreamResponse(_vllm_stream(run, body.prompt), media_type="application/json")

    return await handle(request, body.model, lambda engine: Job([body.prompt], sampling, body.max_tokens),
                        stream=body.stream, reply=reply, stream_reply=stream_reply)


async def _vllm_stream(run: Run, prompt: str):
    texts = [""] * run.n
    try:
        async for i, part in run.parts():
            if isinstance(part, TextPart):
                texts[i] += part.text
            yield (dumps({"text": [prompt + t for t in texts]}) + "\0").encode("utf-8")
    except EdgeLLMError as exc:
        yield (stream_error(exc) + "\0").encode("utf-8")


async def _complete(request: Request, model: str | None, prompt: str | list[dict], *, max_tokens: int | None,
                    **sampling: Any) -> str | Response:
    """One non-streamed completion of a text prompt, or of chat messages through the template;
    or the peer's answer."""

    def prepare(engine: Engine) -> Job:
        text = engine.chat_prompt(prompt) if isinstance(prompt, list) else prompt
        return Job([text], sampling, max_tokens)

    return await handle(request, model, prepare, stream=False, reply=lambda run, choices: choices[0].content,
                        stream_reply=None)  # type: ignore[arg-type]


@router.post("/inference", response_model=InferenceResponse, responses=DOCUMENTED_ERRORS)
async def mosec_inference(body: InferenceRequest, request: Request) -> Any:
    text = await _complete(request, body.model, body.prompt, max_tokens=body.max_tokens, temperature=body.temperature)
    return text if isinstance(text, Response) else {"generated": text}


@router.post("/", response_model=DemoChatResponse, responses=DOCUMENTED_ERRORS)
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
    text = await _complete(request, body.model, messages, max_tokens=max_tokens,
                           top_p=DEMO_TOP_P if body.top_p is None else body.top_p,
                           temperature=DEMO_TEMPERATURE if body.temperature is None else body.temperature)
    if isinstance(text, Response):
        return text
    return {"response": text, "history": [*body.history, [body.prompt, text]], "status": 200,
            "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}


async def _prompt_length(request: Request, model: str | None, messages: list[dict]) -> int:
    manager = server_state(request).manager
    if manager.peer_url(manager.resolve_name(model)) is not None:
        return 0  # the peer applies max_length itself
    length = await with_engine(request, model,
                               lambda name, engine: len(engine.prompt_tokens(engine.chat_prompt(messages))),
                               renders_template=True)
    return length if isinstance(length, int) else 0
