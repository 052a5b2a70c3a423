"""How an embedding checkpoint pools its token states into one vector: sentence-transformers'
`modules.json` names a Pooling module whose `config.json` says mean, CLS or last token. It is written
as `{arch}.pooling_type`, where llama.cpp reads it (llama.cpp's `_try_set_pooling_type`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edge_llm.convert.checkpoint import CheckpointError

MODES = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None


def pooling_type(hf_dir: Path) -> gguf.PoolingType | None:
    """The checkpoint's sentence-transformers pooling, or None when it has no Pooling module."""
    modules_path = hf_dir / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _json(modules_path)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_path}: expected a list of modules")
    path = next((m.get("path") for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")),
                None)
    if path is None:
        return None
    config_path = (hf_dir / path / "config.json").resolve()
    if not config_path.is_relative_to(hf_dir.resolve()):
        raise CheckpointError(f"{modules_path}: the Pooling module's path {path!r} leaves the checkpoint folder")
    pooling = _json(config_path)
    if pooling.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if pooling.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    if pooling.get("pooling_mode") in MODES:
        return MODES[pooling["pooling_mode"]]
    raise CheckpointError(f"{config_path}: llama.cpp pools only by mean, CLS token or last token, not "
                          f"{pooling.get('pooling_mode') or 'this mode'}")


def add_pooling(w: gguf.GGUFWriter, hf_dir: Path, hparams: dict) -> None:
    """The pooling keys llama.cpp's converter writes: the sentence-transformers pooling, and the pooling
    before a classification head (`classifier_pooling`, ModernBERT-style)."""
    kind = pooling_type(hf_dir)
    if kind is not None:
        w.add_pooling_type(kind)
    classifier = hparams.get("classifier_pooling")
    if classifier is not None:
        if classifier not in ("cls", "mean"):
            raise CheckpointError(f"config.json: unsupported classifier_pooling {classifier!r} (cls or mean)")
        w.add_classifier_pooling_type(MODES[classifier])
