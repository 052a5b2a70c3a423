"""`edge-llm serve`: the OpenAI-compatible server (llama-server's flags where they exist).

    edge-llm serve                                   # the demo model on http://127.0.0.1:8080
    edge-llm serve qwen2-7b llama3-8b --keep-alive 600 --memory-budget 12G
    edge-llm serve --config models.toml -np 8 --api-key-file keys.txt --host 0.0.0.0
    edge-llm serve qwen2-7b --peer llama3-8b=http://10.0.0.2:8080   # forwards llama3-8b requests
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from edge_llm.errors import EdgeLLMError
from edge_llm.images import ImageLimits
from edge_llm.options import (
    PROMPT_CACHE,
    QUEUE,
    CommandParser,
    add_load_flags,
    add_model_flags,
    add_sampling_flags,
    given_sampling,
    load_options,
    size_flag,
)
from edge_llm.reasoning import REASONING_FORMATS

if TYPE_CHECKING:
    from edge_llm.server.media import ImagePolicy

API_KEY_ENV = "EDGE_LLM_API_KEY"


def parse_peers(values: list[str]) -> dict[str, str]:
    peers = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise EdgeLLMError(f"--peer {value!r}: expected MODEL=http://HOST:PORT")
        peers[name] = url.rstrip("/")
    return peers


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="models to serve (registry names, .gguf paths, hub references); default: every "
                             "model of --config, or the demo model")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--no-access-log", "--log-disable", dest="access_log", action="store_false",
                   help="no log line per request on stderr (time, client, method, path, status, seconds, tokens)")
    keys = g.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    keys.add_argument("--api-key-file", default=None, help="file with one accepted key per line")
    g.add_argument("--keep-alive", type=float, default=300.0,
                   help="seconds an idle model stays loaded (default 300; negative: forever)")
    g.add_argument("--memory-budget", type=size_flag, default=None,
                   help="most weights to keep loaded at once, e.g. 8G; least recently used idle models unload")
    g.add_argument("--max-models", type=int, default=None, help="most models loaded at once")
    g.add_argument("--preload", action="store_true", help="load every model at start, not on first request")
    g.add_argument("--strict-model-names", action="store_true",
                   help="answer 404 to a model name that is not served, even with one model (default: a "
                        "server of one model serves it under any name, as llama-server does)")
    g.add_argument("--peer", action="append", default=[], metavar="MODEL=URL",
                   help="a model served by another edge-llm server, forwarded there (repeatable)")
    g.add_argument("--max-body-size", type=size_flag, default=8 * 1024 ** 2, metavar="SIZE",
                   help="largest request body (default 8M)")
    g.add_argument("--allowed-hosts", default="", metavar="HOST[,HOST]",
                   help="Host names the server answers to besides loopback names, IP addresses and --host "
                        "(* for any), e.g. behind a proxy or on a LAN name")
    g.add_argument("--cors", default="", metavar="ORIGIN[,ORIGIN]",
                   help="web page origins (https://app.example) allowed to call the server from a browser, "
                        "besides its own pages and loopback ones (* for any)")
    g.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="auto",
                   help="<think> text: auto = split off as reasoning when the chat template knows the tags, "
                        "deepseek = always split, none = leave it inline in the answer (llama-server's flag)")
    g = parser.add_argument_group("images (models with a vision projector, --mmproj)")
    g.add_argument("--image-max-bytes", type=size_flag, default=ImageLimits.max_bytes, metavar="SIZE",
                   help="largest image file (default 10M; the body limit, --max-body-size, applies too)")
    g.add_argument("--image-max-pixels", type=int, default=ImageLimits.max_pixels, metavar="N",
                   help="most pixels in one image, checked before it is decoded (default 25000000)")
    g.add_argument("--max-images", type=int, default=ImageLimits.max_images, metavar="N",
                   help="most images in one request (default 8)")
    g.add_argument("--allow-image-urls", default="", metavar="HOST[,HOST]",
                   help="hosts whose http(s) image URLs the server may fetch (default none: images come "
                        "as data: URLs or base64)")
    r = parser.add_argument_group("scaling out on Ray Serve (extra `ray`; docs/deployment.md: scaling out)")
    r.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="serve as a Ray Serve application on the Ray cluster at ADDRESS (auto: the cluster this "
                        "machine is in; local: start one here): --replicas copies of this server, each with its "
                        "own engine, behind one address")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (with --max-replicas: the fewest)")
    r.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="autoscale up to N replicas on ongoing requests (target: -np per replica)")
    r.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="CPUs each replica reserves; its llama.cpp threads unless -t (default 1)")
    r.add_argument("--router", choices=("affinity", "pow2"), default="affinity",
                   help="affinity (default): a conversation's turns go to the replica holding its KV state, "
                        "unless it is busier than the others; pow2: Serve's default (power of two choices)")
    add_model_flags(parser, defaults={"n_parallel": 4})
    add_load_flags(parser, PROMPT_CACHE, QUEUE)
    add_sampling_flags(parser, n_predict=None, title="sampling defaults (for what a request leaves unset)")
    return parser


def model_refs(args: argparse.Namespace) -> list[str]:
    refs = list(args.models) + ([args.model] if args.model else [])
    if refs:
        return refs
    if args.config:
        from pathlib import Path

        from edge_llm.registry import read_registry_file

        return list(read_registry_file(Path(args.config)))
    return [] if args.peer else ["smollm2-135m"]


def image_policy(args: argparse.Namespace) -> ImagePolicy:
    from edge_llm.server.media import ImagePolicy

    if args.image_max_pixels < 1 or args.max_images < 0 or args.image_max_bytes < 1:
        raise EdgeLLMError("--image-max-pixels and --image-max-bytes must be positive, --max-images >= 0")
    limits = ImageLimits(max_bytes=args.image_max_bytes, max_pixels=args.image_max_pixels, max_images=args.max_images)
    return ImagePolicy(limits, frozenset(h.lower() for h in _comma_list(args.allow_image_urls)))


def api_keys(args: argparse.Namespace) -> list[str] | None:
    if args.api_key_file:
        from edge_llm.server.auth import read_api_keys

        return read_api_keys(args.api_key_file)
    key, source = (args.api_key, "--api-key") if args.api_key is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and not key.strip():  # `--api-key "$KEY"` with KEY unset: not an open server
        raise EdgeLLMError(f"{source} is empty (an unset variable?); give a key, or leave it out to serve without one")
    return [key] if key else None


# How long in-flight requests may run on after SIGTERM before they are ended.
DRAIN_SECONDS = 10
# After the drain, how long open streams have to send their last events before they are cut.
FINISH_SECONDS = 3


def build_app(args: argparse.Namespace):  # noqa: ANN201 - a FastAPI app (imported lazily)
    """The server's app for parsed `edge-llm serve` flags (also what each Ray Serve replica runs)."""
    from edge_llm.server.app import create_app
    from edge_llm.server.models import ModelManager

    refs = model_refs(args)
    defaults: dict[str, object] = {}
    if len(refs) > 1:
        from edge_llm.load_options import DEFAULTS

        defaults["cache_ram"] = DEFAULTS["cache_ram"] // len(refs)  # the default is for the whole server
    options = load_options(args, defaults=defaults)
    manager = ModelManager.from_refs(
        refs, config=args.config, engine=args.engine, options=options,
        keep_alive=args.keep_alive, max_loaded=args.max_models, peers=parse_peers(args.peer),
        memory_budget=args.memory_budget, strict_names=args.strict_model_names)
    return create_app(manager, api_keys=api_keys(args), max_body_bytes=args.max_body_size,
                      bound_host=args.host, allowed_hosts=_comma_list(args.allowed_hosts),
                      cors_origins=_comma_list(args.cors), reasoning_format=args.reasoning_format,
                      sampling_defaults=given_sampling(args), image_policy=image_policy(args),
                      access_log=args.access_log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ray:
        from edge_llm.fleet.deployment import run_on_ray  # MissingExtraError without the `ray` extra
        return run_on_ray(args, sys.argv[2:] if argv is None else argv)
    listening = listening_socket(args.host, args.port)  # before any work: a port in use is one line
    app = build_app(args)
    manager = app.state.edge.manager
    if not api_keys(args) and not _is_loopback(args.host):
        print(f"edge-llm serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    served = ", ".join([*manager.models, *(f"{n} (peer)" for n in manager.peers)])
    print(f"edge-llm serve: http://{args.host}:{args.port}  models: {served}", file=sys.stderr, flush=True)
    if args.access_log:
        _log_requests_to_stderr()
    _serve(app, listening, log_level="info" if load_options(args).verbose else "warning", preload=args.preload)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it (Config.bind_socket) but first thing, so that
    a port in use is one error line before any model is read or banner printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = ("the address is in use (another server?); choose another --port" if exc.errno == errno.EADDRINUSE
                  else exc.strerror or str(exc))
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _log_requests_to_stderr() -> None:
    """access_log.py's lines on stderr, as they are (the CLI's root handler prints warnings only)."""
    from edge_llm.server import access_log

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.logger.addHandler(handler)
    access_log.logger.setLevel(logging.INFO)
    access_log.logger.propagate = False


def _serve(app: object, listening: socket.socket, log_level: str, *, preload: bool = False) -> None:
    """Run uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) it stops accepting at once and
    in-flight requests run on for up to DRAIN_SECONDS. Then every running generation ends at its
    next token (generation.py): each unfinished choice gets a last event with finish_reason
    "length", then usage and [DONE] as usual, so every stream ends with a whole event and a
    complete body, and a non-streamed request still gets its answer (a request still waiting for
    a slot gets a 503). The process then exits 0.

    sse-starlette would otherwise cut every open stream at the signal, without its final chunk or
    [DONE]: its own exit flag is set only FINISH_SECONDS after the drain, as a backstop for a
    stream that cannot end. uvicorn re-raises the signal after its shutdown, into the handler it
    found: exiting 0 there marks the stop as clean for systemd and supervisors.
    """
    import asyncio
    import signal
    import threading

    import uvicorn
    from sse_starlette.sse import AppStatus

    from edge_llm.server.connections import KEEP_ALIVE_SECONDS, BoundedH11Protocol, raise_open_files_limit

    closing = app.state.edge.closing  # type: ignore[attr-defined]

    def end_open_streams() -> None:
        AppStatus.should_exit = True

    class DrainingServer(uvicorn.Server):
        draining = False
        failed: EdgeLLMError | None = None

        async def startup(self, sockets: list | None = None) -> None:
            # --preload in the loop that serves, before the port opens: a model that cannot load
            # is one error line and exit 1 (in the app's startup it was uvicorn's traceback).
            if preload:
                try:
                    await app.state.edge.manager.preload()  # type: ignore[attr-defined]
                except EdgeLLMError as exc:
                    self.failed, self.should_exit = exc, True
                    return
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)
            if not self.draining:
                self.draining = True
                # A signal handler runs between two bytecodes of the event loop's thread: hand over.
                try:
                    loop = asyncio.get_running_loop()
                    loop.call_soon_threadsafe(loop.call_later, DRAIN_SECONDS, closing.set)
                except RuntimeError:  # not serving yet: nothing runs that could be ended
                    pass
                timer = threading.Timer(DRAIN_SECONDS + FINISH_SECONDS, end_open_streams)
                timer.daemon = True
                timer.start()

    raise_open_files_limit()
    AppStatus.disable_automatic_graceful_drain()
    # uvicorn raises the signal again after its drain: SIGTERM and SIGINT (Ctrl-C) both end clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    # uvicorn's own timeout is only the backstop for requests still running after all that.
    host, port = listening.getsockname()[:2]
    # uvicorn's own access log would repeat access_log.py's line (with -v) without the tokens.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=BoundedH11Protocol,
                            timeout_keep_alive=KEEP_ALIVE_SECONDS, access_log=False,
                            timeout_graceful_shutdown=DRAIN_SECONDS + FINISH_SECONDS + 2)
    server = DrainingServer(config)
    server.run(sockets=[listening])
    if server.failed is not None:
        raise server.failed


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
