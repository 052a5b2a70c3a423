"""edge-llm as a Ray Serve application: replicas of the whole server behind one ingress.

    edge-llm serve qwen2-0.5b -np 4 --ray auto --replicas 3 --replica-cpus 4
    serve run edge_llm.fleet.deployment:build argv="qwen2-0.5b -np 4 --replicas 3"

- `EdgeReplica`: one `edge-llm serve` app (its ModelManager, engines, every API) per replica, with
  its llama.cpp threads sized to the CPUs the replica reserves. It takes requests as method calls and
  streams the answer back chunk by chunk (asgi_call.py).
- `Ingress`: Serve's HTTP entry (one cheap replica, no model). It reads the body, computes the
  request's affinity keys (affinity.py) and calls a replica through a handle whose request router
  (router.py) keeps a conversation where its KV state is. A replica that dies before answering is
  replaced by another (nothing was sent yet, so the request is retried); one that dies mid-stream
  ends that stream with an error event in the API's shape, never a hang.

Autoscaling is Serve's: on ongoing requests per replica, target `-np` (each replica decodes that
many at once; more wait in its queue).

No `from __future__ import annotations` here: Serve rebuilds the ingress route's signature, and
FastAPI must see `Request` as a class, not as a string to resolve.
"""


import argparse
import math
import os
import shlex
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from edge_llm.errors import EdgeLLMError, MissingExtraError

try:  # the `ray` extra: this module is the Serve application, imported only for --ray / `serve run`
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.config import RequestRouterConfig
except ImportError:
    raise MissingExtraError("ray[serve] (needed by --ray)", "ray") from None

from edge_llm.fleet.affinity import SESSION_HEADER, prefix_keys
from edge_llm.fleet.asgi_call import HTTPRequest, ResponseStart, call_app
from edge_llm.server.errors import shaped_error
from edge_llm.server.jsonio import dumps

APP_NAME = "edge-llm"
# A request whose replica died before it answered is sent again, to another replica, this often.
RETRIES = 3
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"})
_STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


class EdgeReplica:
    """One edge-llm server (every model of the command line) inside a Serve replica."""

    async def __init__(self, serve_argv: list[str]) -> None:
        from edge_llm.server.serve import build_app, build_parser

        args = build_parser().parse_args(serve_argv)
        self.app = build_app(args)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        if args.preload:  # the replica is ready (to Serve) once its models are in memory
            await self.app.state.edge.manager.preload()

    async def handle(self, request: HTTPRequest, affinity: list[str] | None = None):  # noqa: ANN201
        """The request's answer: a ResponseStart, then body chunks. `affinity` is for the router."""
        async for item in call_app(self.app, request):
            yield item

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


async def _relayed(answer: Any, path: str, kind: str):  # noqa: ANN202 - an async iterator of bytes
    """A stream's chunks; if its replica dies, one last error event in the API's shape."""
    try:
        async for chunk in answer:
            yield chunk
    except RayActorError as exc:
        yield stream_error(path, kind, f"the replica serving this stream stopped ({type(exc).__name__})")
    finally:
        answer.cancel()  # the client left: the replica's generator is cancelled, its slot freed


def stream_error(path: str, kind: str, message: str) -> bytes:
    """The last event of a stream cut by a replica's death, as the API at `path` sends errors."""
    body = dumps(shaped_error(path, 502, message, type="server_error", code="replica_died"))
    if not kind.startswith("text/event-stream"):
        return (body + "\n").encode()  # Ollama's NDJSON
    if path.startswith("/v1/messages"):
        return f"event: error\ndata: {body}\n\n".encode()
    return f"data: {body}\n\n".encode()


def _error(path: str, status: int, message: str) -> Response:
    return Response(dumps(shaped_error(path, status, message)), status_code=status, media_type="application/json")


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _json(body: bytes) -> Any:
    import json

    try:
        return json.loads(body) if body else None
    except ValueError:
        return None  # not JSON: no affinity; the replica answers the error


api = FastAPI(title="edge-llm (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


# Decorated at import, not when the application is built: each replica process imports this module
# and must see the routes bound to the class. Serve ships the decorated class by value, with the
# module globals that exist at that moment: what the route calls is defined above it.
@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: Any, max_body_bytes: int) -> None:
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes = max_body_bytes

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def relay(self, path: str, request: Request) -> Response:
        body = await _bounded_body(request, self.max_body_bytes)
        if body is None:
            return _error(request.url.path, 413, f"the body is larger than {self.max_body_bytes} bytes")
        call = HTTPRequest(method=request.method, path=request.url.path, query=request.url.query,
                           headers=[(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP],
                           body=body, client=tuple(request.client) if request.client else ("127.0.0.1", 0))
        keys = prefix_keys(_json(body), request.headers.get(SESSION_HEADER))
        for attempt in range(RETRIES + 1):
            answer = self.replicas.handle.remote(call, affinity=keys)
            try:
                start = await answer.__anext__()
                assert isinstance(start, ResponseStart)
                headers = {k: v for k, v in start.headers if k.lower() not in _HOP_BY_HOP}
                kind = headers.get("content-type", "")
                if kind.startswith(_STREAM_TYPES):
                    return StreamingResponse(_relayed(answer, call.path, kind), status_code=start.status,
                                             headers=headers)
                chunks = [chunk async for chunk in answer]
                return Response(b"".join(chunks), status_code=start.status, headers=headers)
            except RayActorError:
                answer.cancel()
                if attempt == RETRIES:
                    return _error(call.path, 503, "no replica could answer (they stopped while serving it)")
        raise AssertionError("unreachable")


def application(args: argparse.Namespace, serve_argv: list[str]) -> Any:
    """The Serve application for parsed `edge-llm serve` flags (`--ray` and friends included)."""
    from edge_llm.options import load_options

    options = load_options(args)
    n_parallel = options.n_parallel or 4
    if options.n_threads is None:  # each replica's threads: the CPUs it reserves
        serve_argv = [*serve_argv, "-t", str(max(1, math.floor(args.replica_cpus)))]
    scaling: dict[str, Any] = {"num_replicas": args.replicas}
    if args.max_replicas:
        if args.max_replicas < args.replicas:
            raise EdgeLLMError(f"--max-replicas {args.max_replicas} is below --replicas {args.replicas}")
        scaling = {"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                          "target_ongoing_requests": n_parallel}}
    router = RequestRouterConfig(request_router_class="edge_llm.fleet.router:ConversationRouter") \
        if args.router == "affinity" else RequestRouterConfig()
    from edge_llm.server.serve import DRAIN_SECONDS, FINISH_SECONDS

    replica = serve.deployment(EdgeReplica).options(
        name="EdgeReplica", ray_actor_options={"num_cpus": args.replica_cpus},
        # More than the slots: a replica's own queue orders requests fairly; beyond twice the slots the
        # router holds them, free to pick another replica.
        max_ongoing_requests=2 * n_parallel, request_router_config=router,
        graceful_shutdown_timeout_s=DRAIN_SECONDS + FINISH_SECONDS, **scaling)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(replica.bind(serve_argv), args.max_body_size)


def build(args: dict[str, str]) -> Any:
    """`serve run edge_llm.fleet.deployment:build argv="MODEL -np 4 --replicas 3"`."""
    from edge_llm.server.serve import build_parser

    argv = shlex.split(args.get("argv", ""))
    return application(build_parser().parse_args(argv), argv)


def run_on_ray(args: argparse.Namespace, argv: list[str]) -> int:
    """`edge-llm serve --ray ADDRESS ...`: deploy, then wait for SIGTERM or Ctrl-C and take the
    application down (Serve drains each replica for up to its graceful shutdown time)."""
    import signal

    import ray

    app = application(args, argv)
    if args.ray == "local":
        # A cluster of this machine alone: room for every replica even when they share cores
        # (Ray's CPUs are reservations; the threads are what -t / --replica-cpus give them).
        wanted = (args.max_replicas or args.replicas) * args.replica_cpus
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)), include_dashboard=False,
                 log_to_driver=False, logging_level="warning")
    else:
        ray.init(address=args.ray, log_to_driver=False, logging_level="warning")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"edge-llm serve: http://{args.host}:{args.port} on Ray ({args.router} routing, "
          f"{args.replicas}{'-' + str(args.max_replicas) if args.max_replicas else ''} replicas)",
          file=sys.stderr, flush=True)
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)
    serve.delete(APP_NAME)
    if args.ray == "local":
        serve.shutdown()
        ray.shutdown()
    return 0
