"""`edge-llm pull`: download a model into the standard Hugging Face or ModelScope cache.

    edge-llm pull qwen2-7b                                   # a registry name (models.toml)
    edge-llm pull hf:Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m      # the one GGUF of that quant (all its shards)
    edge-llm pull hf:Qwen/Qwen2-0.5B --include "*.json" --include "*.safetensors"   # a checkpoint
    edge-llm pull ms:qwen/Qwen2-7B-Instruct-GGUF:q5_k_m      # the same from ModelScope
    edge-llm pull hf:ggml-org/gemma-3-4b-it-GGUF:q4_k_m      # + its mmproj-*.gguf (image input) beside it

A GGUF pulled from a repo that also holds projectors (mmproj-*.gguf, the vision half llama.cpp's
mtmd loads) comes with one of them, in the same folder: the one of the model's own type if there is
one, else f16 (hub.pick_mmproj says why); `--mmproj FILE` names another, `--no-mmproj` skips it.

Downloads go through `huggingface_hub` / `modelscope`, so the caches, resume of interrupted
downloads, progress bars and the environment are theirs: HF_HOME / HF_HUB_CACHE, HF_ENDPOINT
(mirrors), HF_TOKEN, HF_HUB_OFFLINE, MODELSCOPE_CACHE. A pulled model resolves offline afterwards
(`edge_llm.registry.resolve`) by the same reference.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_llm import hub
from edge_llm.errors import EdgeLLMError, InvalidParameterError, MissingExtraError, ModelNotFoundError
from edge_llm.options import CommandParser

logger = logging.getLogger(__name__)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class PullRequest:
    """What to fetch: one GGUF (with its shards) when `file` or `quant` is set, else a snapshot."""

    ref: hub.HubRef
    include: tuple[str, ...] = ()


def parse_pull_ref(ref: str, source: str | None = None, revision: str | None = None,
                   registry: dict | None = None) -> hub.HubRef:
    """A registry name, `hf:`/`ms:` reference, or bare ORG/NAME (with `source`) -> HubRef."""
    from edge_llm.registry import load_registry

    registry = registry if registry is not None else load_registry()
    if ref in registry:
        spec = registry[ref]
        if spec.source not in ("hf", "modelscope"):
            raise InvalidParameterError(f"model {ref!r} is {spec.source}, nothing to download")
        file = spec.file if spec.format == "gguf" else None
        return hub.HubRef(spec.source, spec.repo, file=file, revision=revision)
    if hub.is_hub_ref(ref):
        parsed = hub.parse_hub_ref(ref)
    else:
        parsed = hub.parse_hub_ref(f"{'ms' if source == 'modelscope' else 'hf'}:{ref}")
    if source is not None and hub.HUB_SOURCES[source] != parsed.source:
        raise InvalidParameterError(f"--source {source} contradicts the reference {ref!r}", param="source")
    if revision:
        parsed = hub.HubRef(parsed.source, parsed.repo, parsed.file, parsed.quant, revision)
    return parsed


def pull(ref: str, *, source: str | None = None, revision: str | None = None,
         include: list[str] | tuple[str, ...] = (), registry: dict | None = None,
         mmproj: str | bool | None = None) -> Path:
    """Download `ref` (see the module doc) and return the local GGUF file or checkpoint folder.

    `mmproj`: for a GGUF, None also fetches the repo's projector (mmproj-*.gguf) when it has one,
    False never, a file name that projector (a registry entry's `mmproj` key does the same)."""
    from edge_llm.registry import load_registry

    registry = registry if registry is not None else load_registry()
    hub_ref = parse_pull_ref(ref, source, revision, registry)
    if mmproj is None and ref in registry and getattr(registry[ref], "mmproj", None):
        mmproj = registry[ref].mmproj
    if hub_ref.source == "hf":
        return _pull_hf(hub_ref, tuple(include), mmproj)
    return _pull_modelscope(hub_ref, tuple(include), mmproj)


def _projector(hub_ref: hub.HubRef, files: list[str], model_file: str, mmproj: str | bool | None) -> str | None:
    """The projector file to fetch beside `model_file` (None: none)."""
    if mmproj is False:
        return None
    if isinstance(mmproj, str):
        if mmproj not in files:
            raise ModelNotFoundError(f"{hub_ref.repo} has no projector file {mmproj} (it has: "
                                     f"{', '.join(f for f in files if hub.is_mmproj(f)) or 'no mmproj-*.gguf'})")
        return mmproj
    return hub.pick_mmproj(files, model_file, hub_ref.quant)


def shard_names(name: str, files: list[str]) -> list[str]:
    """All shards of a split GGUF given its first (`x-00001-of-00003.gguf`), or just the file."""
    match = _SHARD.search(name)
    if not match:
        return [name]
    stem, total = name[: match.start()], int(match.group(2))
    wanted = [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    missing = [w for w in wanted if files and w not in files]
    if missing:
        raise ModelNotFoundError(f"the repo lacks shard(s) {', '.join(missing)} of {name}")
    return wanted


def _choose_gguf(hub_ref: hub.HubRef, files: list[str]) -> str:
    if hub_ref.file:
        if hub_ref.file not in files:
            raise ModelNotFoundError(f"{hub_ref.repo} has no file {hub_ref.file}")
        return hub_ref.file
    name = hub.pick_gguf(files, hub_ref.quant)
    if name is None:
        ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
        listing = ", ".join(ggufs[:12]) or "no .gguf files"
        raise ModelNotFoundError(f"{hub_ref.repo} has no GGUF for quant {hub_ref.quant!r} (it has: {listing})")
    return name


# Network failures below the HTTP client, whichever client a hub library uses (httpx, httpx2,
# requests): each keeps the socket's error in its exception chain.
_UNREACHABLE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def unreachable_reason(exc: BaseException) -> str | None:
    """Why the hub could not be reached ("connection refused", "host name not found", ...) when
    `exc` comes from a network failure, else None."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is not None and all(e is not c for c in chain):
            chain.append(e)
            todo += [e.__cause__, e.__context__]
    # The socket's own error says most; a library's wrapper (modelscope's NetworkError is a
    # ConnectionError) only that something failed.
    for kind, reason in ((socket.gaierror, "host name not found"), (ConnectionRefusedError, "connection refused"),
                         (TimeoutError, "timed out")):
        if any(isinstance(e, kind) for e in chain):
            return reason
    for e in chain:
        if isinstance(e, ConnectionError) or (isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS):
            return e.strerror or "connection failed"
    return None


def _unreachable_error(exc: BaseException, hub_ref: hub.HubRef) -> EdgeLLMError | None:
    reason = unreachable_reason(exc)
    if reason is None:
        return None
    if hub_ref.source == "hf":
        from huggingface_hub import constants

        return EdgeLLMError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}): check the "
                            "network connection (HF_ENDPOINT names a mirror)")
    return EdgeLLMError(f"cannot reach ModelScope ({reason}): check the network connection "
                        "(MODELSCOPE_ENDPOINT names another endpoint)")


def _hf_error(exc: Exception, hub_ref: hub.HubRef) -> EdgeLLMError:
    from huggingface_hub import errors

    name = type(exc).__name__
    unreachable = _unreachable_error(exc, hub_ref)
    if unreachable is not None:  # before the rest: a failed connection is also a "local entry not found"
        return unreachable
    if isinstance(exc, errors.GatedRepoError):
        return EdgeLLMError(f"{hub_ref.repo} is gated: accept its license on the hub and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"{hub_ref.repo} not found on the hub (or private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelNotFoundError(f"{hub_ref.repo} has no revision {hub_ref.revision!r}")
    if isinstance(exc, errors.EntryNotFoundError):
        return ModelNotFoundError(f"{hub_ref.repo}: file not found ({exc})")
    if isinstance(exc, errors.OfflineModeIsEnabled) or isinstance(exc, errors.LocalEntryNotFoundError):
        return EdgeLLMError(f"{hub_ref} is not in the cache and downloads are off (HF_HUB_OFFLINE) "
                            "or the hub cannot be reached")
    return EdgeLLMError(f"download of {hub_ref} failed: {name}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _pull_hf(hub_ref: hub.HubRef, include: tuple[str, ...], mmproj: str | bool | None = None) -> Path:
    from huggingface_hub import HfApi, constants, errors, hf_hub_download, snapshot_download

    wants_file = bool(hub_ref.file or hub_ref.quant)
    if constants.HF_HUB_OFFLINE:  # nothing to ask the network: the cache has it or it does not
        found = hub.find_cached_gguf(hub_ref) if wants_file else \
            hub.find_cached_checkpoint("hf", hub_ref.repo, hub_ref.revision)
        if found is None:
            raise EdgeLLMError(f"{hub_ref} is not in the cache and HF_HUB_OFFLINE is set")
        return found
    try:
        if not wants_file:
            folder = snapshot_download(hub_ref.repo, revision=hub_ref.revision, allow_patterns=list(include) or None)
            return Path(folder)
        # The repo's file list from its info: one request, not retried (list_repo_files retries a
        # refused connection for 23 s), so an unreachable hub is said at once.
        info = HfApi().model_info(hub_ref.repo, revision=hub_ref.revision)
        files = [s.rfilename for s in info.siblings or []]
        names = shard_names(_choose_gguf(hub_ref, files), files)
        if (projector := _projector(hub_ref, files, names[0], mmproj)) is not None:
            names.append(projector)
        paths = [Path(hf_hub_download(hub_ref.repo, name, revision=hub_ref.revision)) for name in names]
        _report_projector(paths, projector)
        return paths[0]
    except EdgeLLMError:
        raise
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
            errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise _hf_error(exc, hub_ref) from None
    except Exception as exc:  # the HTTP client's own errors (ConnectError ...), disk full...
        unreachable = _unreachable_error(exc, hub_ref)
        if unreachable is not None:
            raise unreachable from None
        if isinstance(exc, OSError):
            from edge_llm.files import os_error_line

            raise EdgeLLMError(f"download of {hub_ref} failed: {os_error_line(exc)}") from None
        raise


def _pull_modelscope(hub_ref: hub.HubRef, include: tuple[str, ...], mmproj: str | bool | None = None) -> Path:
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.file_download import model_file_download
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise MissingExtraError("modelscope", "modelscope") from None
    cache = str(hub.modelscope_cache_dir())
    revision = hub_ref.revision or "master"
    try:
        if not (hub_ref.file or hub_ref.quant):
            return Path(snapshot_download(hub_ref.repo, revision=revision, cache_dir=cache,
                                          allow_file_pattern=list(include) or None))
        files = [f["Path"] for f in HubApi().get_model_files(hub_ref.repo, revision=revision, recursive=True)]
        names = shard_names(_choose_gguf(hub_ref, files), files)
        if (projector := _projector(hub_ref, files, names[0], mmproj)) is not None:
            names.append(projector)
        paths = [Path(model_file_download(hub_ref.repo, name, revision=revision, cache_dir=cache)) for name in names]
        _report_projector(paths, projector)
        return paths[0]
    except EdgeLLMError:
        raise
    except Exception as exc:  # modelscope raises bare exceptions and requests' errors alike
        unreachable = _unreachable_error(exc, hub_ref)
        if unreachable is not None:
            raise unreachable from None
        raise EdgeLLMError(f"ModelScope download of {hub_ref} failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _report_projector(paths: list[Path], projector: str | None) -> None:
    if projector is not None:
        logger.info("projector %s beside the model", paths[-1])
        print(f"mmproj: {paths[-1]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="edge-llm pull", description="Download a GGUF file or an HF checkpoint into the hub cache.",
        epilog="Environment: HF_HOME, HF_ENDPOINT (mirror), HF_TOKEN, HF_HUB_OFFLINE, MODELSCOPE_CACHE.")
    parser.add_argument("ref", help="registry name, hf:ORG/REPO[:QUANT|:FILE.gguf][@REV], ms:..., or ORG/REPO")
    parser.add_argument("--source", choices=["hf", "modelscope"], default=None,
                        help="hub for a bare ORG/REPO (default: hf)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="only files matching GLOB (snapshots; repeatable)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--mmproj", default=None, metavar="FILE",
                       help="the projector (mmproj-*.gguf) to fetch with a GGUF (default: the model's type, else f16)")
    which.add_argument("--no-mmproj", action="store_true", help="fetch no projector with a GGUF")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    if not args.verbose:
        # The hub libraries' retry warnings (each once per attempt, some twice): -v shows them; without
        # it the error line says what failed. Levels would not do: modelscope sets its own at import.
        logging.disable(logging.WARNING)
    path = pull(args.ref, source=args.source, revision=args.revision, include=args.include,
                mmproj=False if args.no_mmproj else args.mmproj)
    print(path)
    return 0
