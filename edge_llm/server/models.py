"""Which models a server answers for, and which of them are in memory.

- Only the models the server was started with can be named by a request (by served name, never
  by path). A server of exactly one model serves it under any name, as llama-server does (scripts
  hard-code "gpt-3.5-turbo"; the answer names the real model); with several models, or with
  --strict-model-names, an unknown name is a 404, whatever it looks like.
- Models load on their first request (`--preload` loads them at start), and unload after
  `keep_alive` seconds without requests (negative: never).
- A memory budget bounds the models kept at once. A model's cost is the size of its weights
  file(s), which dominates at laptop context sizes; before a load that would exceed the budget,
  the least recently used idle models are unloaded. If busy models hold the memory, the request
  gets a 503 with Retry-After.
- Peers: models served by other edge-llm servers. Requests for them are forwarded (forward.py),
  so one front address reaches every model of a multi-server deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_llm.engines.base import Engine, load_engine
from edge_llm.errors import EdgeLLMError, ModelLoadError, ModelNotFoundError, OverloadedError
from edge_llm.load_options import LoadOptions
from edge_llm.model_kind import Kind, model_kind

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    ref: str  # what the loader resolves: a registry name, a path or a hub reference (operator-given)
    size_bytes: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    engine: Engine | None = None
    active: int = 0  # requests holding a lease on the engine
    last_used: float = field(default_factory=time.monotonic)
    path: Path | None = None  # the weights on disk, when resolved at start (for model info)
    keep_alive: float | None = None  # set by a request (Ollama's keep_alive); None: the server's
    file_kind: Kind | None = None  # what the file says it is for (model_kind.py), before it is loaded

    @property
    def kind(self) -> Kind:
        """chat, embedding or rerank: the loaded engine's, else the file's."""
        if self.engine is not None:
            return self.engine.kind
        return self.file_kind or "chat"
    projector: Path | None = None  # the vision projector it loads with (--mmproj, or found beside the weights)

    @property
    def vision(self) -> bool:
        """Whether it takes images: the loaded engine says; before loading, its projector file."""
        if self.engine is not None:
            return self.engine.takes_images
        return self.projector is not None


class Lease:
    """A request's hold on a loaded engine: the engine is not unloaded while a lease is open."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.engine: Engine = model.engine  # type: ignore[assignment]
        self._open = True
        model.active += 1

    def release(self) -> None:
        if self._open:
            self._open = False
            self.model.active -= 1
            self.model.last_used = time.monotonic()


class ModelManager:
    def __init__(self, models: dict[str, str], *, loader: Callable[[str], Engine] | None = None,
                 engine: str = "llama.cpp", options: LoadOptions | None = None, config: str | None = None,
                 keep_alive: float = 300.0, memory_budget: int | None = None, max_loaded: int | None = None,
                 peers: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
                 paths: dict[str, Path] | None = None, strict_names: bool = False,
                 projectors: dict[str, Path] | None = None) -> None:
        self.peers = dict(peers or {})
        clash = set(models) & set(self.peers)
        if clash:
            raise EdgeLLMError(f"served both here and by a peer: {', '.join(sorted(clash))}")
        if not models and not self.peers:
            raise EdgeLLMError("no models to serve")
        sizes, paths = sizes or {}, paths or {}
        self.models = {name: ServedModel(name, ref, sizes.get(name, 0), path=paths.get(name),
                                         file_kind=model_kind(paths[name]).kind if name in paths else None,
                                         projector=(projectors or {}).get(name))
                       for name, ref in models.items()}
        self.strict_names = strict_names
        self.keep_alive = keep_alive
        self.memory_budget = memory_budget
        self.max_loaded = max_loaded
        options = options or LoadOptions()
        self._loader = loader or (lambda ref: load_engine(ref, engine=engine, options=options, config=config))
        self._load_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task | None = None

    @classmethod
    def from_refs(cls, refs: list[str], *, config: str | None = None, **kwargs: object) -> ModelManager:
        """Serve model references as given on the command line: each is resolved now, so a model
        that is not on disk fails at start, and is served under its registry name or file stem;
        its load options are checked now too."""
        from edge_llm.engines.base import engine_class
        from edge_llm.engines.projector import projector_path
        from edge_llm.registry import load_registry, resolve

        registry = load_registry(config)
        engine = engine_class(str(kwargs.get("engine", "llama.cpp")))
        options = kwargs.get("options") or LoadOptions()
        models, sizes, paths, projectors = {}, {}, {}, {}
        for ref in refs:
            resolved = resolve(ref, registry)
            if resolved.name in models:
                raise EdgeLLMError(f"two models would be served as {resolved.name!r}")
            # What its engine would refuse at the first request (a cache type, a cache folder, -md ...)
            engine.check_options(options.resolve(resolved.spec))  # type: ignore[union-attr]
            models[resolved.name] = ref
            sizes[resolved.name] = _weights_size(resolved.path)
            paths[resolved.name] = resolved.path
            if resolved.is_gguf and kwargs.get("engine", "llama.cpp") == "llama.cpp":
                projectors[resolved.name] = projector_path(options.resolve(resolved.spec).mmproj, resolved.path)
        return cls(models, config=config, sizes=sizes, paths=paths, projectors=projectors,  # type: ignore[arg-type]
                   **kwargs)

    # -- names ----------------------------------------------------------------------------------

    @property
    def default_name(self) -> str:
        return next(iter(self.models)) if self.models else next(iter(self.peers))

    def resolve_name(self, name: str | None) -> str:
        """The served name a request means: its `model`; the first model when it names none; the
        only model when it names another (unless strict_names)."""
        if name is None or name == "":
            return self.default_name
        if name in self.models or name in self.peers:
            return name
        if not self.strict_names and len(self.models) + len(self.peers) == 1:
            return self.default_name
        raise ModelNotFoundError(f"the model {name!r} does not exist on this server; "
                                 f"served: {', '.join([*self.models, *self.peers])}", param="model")

    def peer_url(self, name: str) -> str | None:
        return self.peers.get(name)

    def loaded(self) -> dict[str, Engine]:
        return {m.name: m.engine for m in self.models.values() if m.engine is not None}

    # -- leases ---------------------------------------------------------------------------------

    async def acquire(self, name: str) -> Lease:
        """The named local model's engine, loading it first if needed; release the lease when done."""
        model = self.models[name]
        if model.engine is None:
            if self._load_lock is None:
                self._load_lock = asyncio.Lock()
            async with self._load_lock:
                if model.engine is None:
                    await self._make_room(model)
                    model.engine = await asyncio.to_thread(self._load, model)
        model.last_used = time.monotonic()
        return Lease(model)

    def _load(self, model: ServedModel) -> Engine:
        log.info("loading model %s (%s)", model.name, model.ref)
        try:
            return self._loader(model.ref)
        except EdgeLLMError:
            raise
        except Exception as exc:  # a loader bug must not look like a bad request
            raise ModelLoadError(f"could not load {model.name!r}: {exc}") from None

    async def _make_room(self, model: ServedModel) -> None:
        def over() -> bool:
            loaded = [m for m in self.models.values() if m.engine is not None]
            if self.max_loaded is not None and len(loaded) + 1 > self.max_loaded:
                return True
            if self.memory_budget is not None:
                return sum(m.size_bytes for m in loaded) + model.size_bytes > self.memory_budget
            return False

        if self.memory_budget is not None and model.size_bytes > self.memory_budget:
            raise ModelLoadError(f"the model {model.name!r} needs {model.size_bytes / 2**20:.0f} MiB, more than "
                                 f"the whole memory budget of {self.memory_budget / 2**20:.0f} MiB")
        while over():
            idle = [m for m in self.models.values() if m.engine is not None and m.active == 0]
            if not idle:
                raise OverloadedError(f"cannot load {model.name!r} now: the models in memory are busy; retry later")
            await self._unload(min(idle, key=lambda m: m.last_used))

    async def _unload(self, model: ServedModel) -> None:
        engine, model.engine = model.engine, None
        if engine is not None:
            log.info("unloading model %s", model.name)
            await asyncio.to_thread(engine.close)

    # -- lifecycle ------------------------------------------------------------------------------

    async def preload(self) -> None:
        """Load every model now (serve --preload)."""
        for name in self.models:
            (await self.acquire(name)).release()

    async def start(self, *, preload: bool = False) -> None:
        if preload:
            await self.preload()
        if self.models:
            self._reaper = asyncio.create_task(self._unload_idle_forever())

    def keep_alive_of(self, model: ServedModel) -> float:
        return self.keep_alive if model.keep_alive is None else model.keep_alive

    def set_keep_alive(self, name: str, seconds: float) -> None:
        """How long this model stays loaded once idle, from now on (negative: forever)."""
        self.models[name].keep_alive = seconds

    async def unload_if_idle(self, name: str) -> None:
        model = self.models[name]
        if model.engine is not None and model.active == 0:
            await self._unload(model)

    async def _unload_idle_forever(self) -> None:
        while True:
            alive = [k for k in (self.keep_alive_of(m) for m in self.models.values()) if k >= 0]
            await asyncio.sleep(max(0.25, min([5.0, *(k / 4 for k in alive)])))
            now = time.monotonic()
            for model in self.models.values():
                keep = self.keep_alive_of(model)
                if model.engine is not None and model.active == 0 and 0 <= keep <= now - model.last_used:
                    await self._unload(model)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
        for model in self.models.values():
            await self._unload(model)


def _weights_size(path: Path) -> int:
    if path.is_file():
        # A sharded GGUF names its first shard; its siblings are part of the same model.
        if "-00001-of-" in path.name:
            stem = path.name.split("-00001-of-")[0]
            return sum(p.stat().st_size for p in path.parent.glob(f"{stem}-*-of-*.gguf"))
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
