"""Where hub weights live on disk: the Hugging Face and ModelScope caches.

This module answers "is this file already here?" without touching the network; `edge-llm pull`
(the download side) fills the same caches, so a model pulled once resolves offline afterwards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from edge_llm.errors import InvalidParameterError

HUB_SOURCES = {"hf": "hf", "huggingface": "hf", "ms": "modelscope", "modelscope": "modelscope"}
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """`hf:ORG/REPO[:QUANT | :FILE.gguf][@REVISION]`, or `ms:` / `modelscope:` for ModelScope."""

    source: str  # "hf" | "modelscope"
    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        tail = self.file or self.quant
        text = f"{'hf' if self.source == 'hf' else 'ms'}:{self.repo}"
        text += f":{tail}" if tail else ""
        return text + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(ref: str) -> bool:
    prefix, sep, _ = ref.partition(":")
    return bool(sep) and prefix.lower() in HUB_SOURCES


def parse_hub_ref(ref: str) -> HubRef:
    prefix, _, rest = ref.partition(":")
    source = HUB_SOURCES.get(prefix.lower())
    if source is None:
        raise InvalidParameterError(f"not a hub reference: {ref!r} (expected hf:ORG/REPO[:QUANT])")
    rest, _, revision = rest.partition("@")
    repo, _, selector = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidParameterError(f"bad hub reference {ref!r}: the repo must look like ORG/NAME")
    file = selector if selector.lower().endswith(".gguf") else None
    quant = selector.lower() if selector and not file else None
    return HubRef(source, repo, file=file, quant=quant, revision=revision or None)


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def modelscope_cache_dir() -> Path:
    root = os.environ.get("MODELSCOPE_CACHE") or os.path.join(Path.home(), ".cache", "modelscope", "hub")
    return Path(root)


def cached_repo_dirs(source: str, repo: str, revision: str | None = None) -> list[Path]:
    """Local folders that may hold files of this repo, newest first."""
    if source == "hf":
        repo_dir = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
        snapshots = repo_dir / "snapshots"
        if revision:
            ref_file = repo_dir / "refs" / revision
            commit = ref_file.read_text().strip() if ref_file.is_file() else revision
            return [snapshots / commit] if (snapshots / commit).is_dir() else []
        if not snapshots.is_dir():
            return []
        main_ref = repo_dir / "refs" / "main"
        dirs = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        if main_ref.is_file():
            main = snapshots / main_ref.read_text().strip()
            dirs = [main] + [d for d in dirs if d != main] if main.is_dir() else dirs
        return dirs
    # ModelScope changed its cache layout over releases: <cache>/models/ORG/NAME and <cache>/ORG/NAME.
    root = modelscope_cache_dir()
    candidates = [root / "models" / repo, root / repo, root / "models" / repo.replace(".", "___")]
    return [d for d in candidates if d.is_dir()]


def is_mmproj(name: str) -> bool:
    """A projector GGUF (the vision/audio half llama.cpp's mtmd loads beside a model): hub repos name
    them mmproj-*.gguf (mmproj-model-f16.gguf, mmproj-F16.gguf, mmproj-gemma-3-4b-it-f16.gguf...)."""
    base = Path(name).name.lower()
    return base.startswith("mmproj") and base.endswith(".gguf")


def pick_gguf(files: list[str], quant: str) -> str | None:
    """The model GGUF among `files` whose name carries `quant` (first shard of a split file); a
    projector (mmproj-*.gguf) is never the model, whatever its type."""
    pattern = re.compile(rf"(^|[-_.]){re.escape(quant.lower())}([-_.]|$)")
    matches = [f for f in files if f.lower().endswith(".gguf") and not is_mmproj(f)
               and pattern.search(Path(f).stem.lower())]
    first_shards = [f for f in matches if not _SHARD.search(f) or _SHARD.search(f).group(1) == "00001"]
    return sorted(first_shards, key=len)[0] if first_shards else None


# The projector a pull takes when the repo has several: the model's own float type when a projector
# has it, else f16 (what llama.cpp's converter writes and mtmd runs at full speed on any CPU; bf16 is
# slow without AVX512-BF16, f32 twice the size, quantized projectors lose accuracy), then these.
MMPROJ_PREFERENCE = ("f16", "bf16", "q8_0", "f32")


def pick_mmproj(files: list[str], model_file: str | None = None, quant: str | None = None) -> str | None:
    """The projector to fetch with `model_file` (or a model of type `quant`): among the repo's
    mmproj-*.gguf, those in the model's folder first; by type as MMPROJ_PREFERENCE says."""
    projectors = [f for f in files if is_mmproj(f)]
    if model_file is not None:
        folder = str(Path(model_file).parent)
        beside = [f for f in projectors if str(Path(f).parent) == folder]
        projectors = beside or projectors
    if not projectors:
        return None

    def kind(name: str) -> str | None:
        stem = Path(name).stem.lower()
        return next((k for k in MMPROJ_PREFERENCE if re.search(rf"(^|[-_.]){k}([-_.]|$)", stem)), None)

    wanted = quant.lower() if quant else None
    if wanted is None and model_file is not None:
        wanted = kind(model_file)
    order = ([wanted] if wanted in MMPROJ_PREFERENCE else []) + list(MMPROJ_PREFERENCE)
    return min(projectors, key=lambda f: (order.index(kind(f)) if kind(f) in order else len(order), len(f), f))


def find_cached_gguf(ref: HubRef) -> Path | None:
    """The local path of the GGUF a hub reference names, if it has been pulled."""
    for folder in cached_repo_dirs(ref.source, ref.repo, ref.revision):
        if ref.file:
            candidate = folder / ref.file
            if candidate.is_file():
                return candidate
            continue
        files = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf") if not is_mmproj(p.name)]
        name = pick_gguf(files, ref.quant) if ref.quant else (files[0] if len(files) == 1 else None)
        if name:
            return folder / name
    return None


def find_cached_checkpoint(source: str, repo: str, revision: str | None = None) -> Path | None:
    """The local folder of a pulled HF-format checkpoint (has config.json), if any."""
    for folder in cached_repo_dirs(source, repo, revision):
        if (folder / "config.json").is_file():
            return folder
    return None
