"""Requests for a peer's model are passed on to that peer, body and answer untouched (streams
included), so a front address (nginx round-robin over several servers) reaches every model.

The client's Authorization header goes along: a deployment shares one API key. A forwarded
request carries a marker header and is never forwarded again, so a misconfigured pair of peers
answers 404 instead of bouncing a request between them forever.
"""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import Response

from edge_llm.errors import ModelNotFoundError
from edge_llm.server.errors import error_response
from edge_llm.server.generation import StreamResponse

FORWARDED_HEADER = "x-edge-llm-forwarded"
_PASSED_HEADERS = ("authorization", "x-api-key", "anthropic-version", "content-type", "accept")
_RETURNED_HEADERS = ("content-type", "retry-after", "cache-control")


def peer_client() -> httpx.AsyncClient:
    # No read timeout: a long generation streams for minutes; the connect timeout catches dead peers.
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)


async def forward(request: Request, base_url: str, client: httpx.AsyncClient, model: str) -> Response:
    if request.headers.get(FORWARDED_HEADER):
        raise ModelNotFoundError(f"the model {model!r} is not served by this peer either (forwarding loop?)",
                                 param="model")
    headers = {k: v for k, v in request.headers.items() if k in _PASSED_HEADERS}
    headers[FORWARDED_HEADER] = "1"
    upstream = client.build_request(request.method, base_url.rstrip("/") + request.url.path,
                                    params=request.query_params, headers=headers, content=await request.body())
    try:
        answer = await client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        return error_response(502, f"the peer serving {model!r} ({base_url}) is unreachable: "
                              f"{type(exc).__name__}", type="server_error", code="peer_unreachable")

    async def body():
        async for chunk in answer.aiter_raw():
            yield chunk

    response = StreamResponse(body(), status_code=answer.status_code,
                              headers={k: v for k, v in answer.headers.items() if k in _RETURNED_HEADERS})
    response.cleanup = answer.aclose
    return response
