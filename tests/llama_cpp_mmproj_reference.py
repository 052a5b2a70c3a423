"""llama.cpp's own projector converters as the reference for edge-llm's `mmproj` GGUFs, from the
llama.cpp that the pinned llama-cpp-python vendors (the sources come through llama_cpp_reference).

- `reference_mmproj`: `convert_hf_to_gguf.py --mmproj` (Gemma 3, SmolVLM, Qwen2-VL, InternVL), run
  by llama_cpp_reference.reference_gguf with `--mmproj` added to its command line; cached the same way.
- `reference_llava_mmproj`: LLaVA-1.5 is not taken by `--mmproj` (it converts Pixtral's tower only),
  so the reference is llama.cpp's documented LLaVA path, tools/mtmd/legacy-models:
  `llava_surgery_v2.py -C` splits a copy of the checkpoint into `llava.clip` (the CLIP tower) and
  `llava.projector`, and `convert_image_encoder_to_gguf.py --llava-projector ... --clip-model-is-vision`
  writes the projector GGUF from a folder holding the tower with the checkpoint's vision_config as
  its config.json (the step llama.cpp's LLaVA guide does by hand). Cached by the checkpoint's bytes.
  That script predates transformers 5, whose CLIPVisionModel has no `vision_model` submodule any
  more (its weights lost the prefix): it runs with the loaded tower wrapped back into one, the layout
  it was written for (`_LEGACY_RUNNER`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llama_cpp_reference import PINNED, _checkpoint_hash, cache_dir, llama_cpp_dir, reference_gguf

MMPROJ_PATCH = "sys.argv.append('--mmproj')"
# Runs a legacy-models script as __main__ with transformers 5's CLIPVisionModel presented as the
# script expects it: the tower under `.vision_model`, its state dict keys prefixed `vision_model.`.
_LEGACY_RUNNER = """
import runpy, sys
import torch, transformers
_load = transformers.CLIPVisionModel.from_pretrained
class Tower(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.vision_model = inner
transformers.CLIPVisionModel.from_pretrained = classmethod(lambda cls, *a, **k: Tower(_load(*a, **k)))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
_LEGACY = "vendor/llama.cpp/tools/mtmd/legacy-models/"


def reference_mmproj(hf_dir: Path, outtype: str = "f16") -> Path:
    """llama.cpp's `convert_hf_to_gguf.py --mmproj` output for `hf_dir` (cached)."""
    return reference_gguf(hf_dir, outtype, patch=MMPROJ_PATCH)


def legacy_models_dir() -> Path:
    """llama.cpp's tools/mtmd/legacy-models from the pinned sdist: in $EDGE_LLM_LLAMA_CPP_SDIST when it
    is an extracted sdist, else extracted once from the sdist tarball beside the cached converter."""
    vendored = llama_cpp_dir()  # downloads the sdist when needed
    inside = vendored / "tools" / "mtmd" / "legacy-models"
    if (inside / "convert_image_encoder_to_gguf.py").is_file():
        return inside
    folder = cache_dir() / f"llama_cpp_python-{PINNED}-legacy-models"
    if not folder.is_dir():
        given = os.environ.get("EDGE_LLM_LLAMA_CPP_SDIST")
        candidates = [Path(given).expanduser()] if given else []
        candidates.append(cache_dir() / "downloads" / f"llama_cpp_python-{PINNED}.tar.gz")
        tarball = next((p for p in candidates if p.is_file()), None)
        if tarball is None:
            raise FileNotFoundError(f"no llama-cpp-python {PINNED} sdist tarball to take {_LEGACY} from; set "
                                    "EDGE_LLM_LLAMA_CPP_SDIST to the extracted sdist")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(tarball) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.removeprefix(top + "/").startswith(_LEGACY)]
            tar.extractall(partial, members=members, filter="data")
        (partial / top / _LEGACY).rename(folder)
        shutil.rmtree(partial)
    return folder


def _run(args: list[str], cwd: Path, env: dict) -> None:
    result = subprocess.run([sys.executable, "-c", _LEGACY_RUNNER, *args], capture_output=True, text=True, env=env,
                            cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's {Path(args[0]).name} failed (exit {result.returncode}):\n"
                           + "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:]))


def reference_llava_mmproj(hf_dir: Path, outtype: str = "f16") -> Path:
    """llama.cpp's LLaVA-1.5 projector GGUF for `hf_dir` (hub layout: `vision_tower.vision_model.*`),
    made the way its guide does (cached)."""
    if outtype not in ("f16", "f32"):
        raise ValueError("the legacy LLaVA converter writes f16 or f32")
    key = hashlib.sha256(f"{PINNED}|llava-legacy|{outtype}|{_checkpoint_hash(hf_dir)}".encode()).hexdigest()[:32]
    out = cache_dir() / "reference-gguf" / f"{key}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    legacy, vendored = legacy_models_dir(), llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": str(vendored / "gguf-py"), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1"}
    config = json.loads((hf_dir / "config.json").read_text())
    preprocessor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work, vit, dest = Path(tmp) / "llava", Path(tmp) / "vit", Path(tmp) / "out"
        shutil.copytree(hf_dir, work)  # the surgery rewrites the folder it is given
        _run([str(legacy / "llava_surgery_v2.py"), "-C", "-m", str(work)], work, env)
        vit.mkdir()
        shutil.copy(work / "llava.clip", vit / "pytorch_model.bin")
        (vit / "config.json").write_text(json.dumps({**config["vision_config"], "architectures": ["CLIPVisionModel"]}))
        _run([str(legacy / "convert_image_encoder_to_gguf.py"), "-m", str(vit), "--llava-projector",
              str(work / "llava.projector"), "--output-dir", str(dest), "--clip-model-is-vision",
              "--image-mean", *map(str, preprocessor["image_mean"]), "--image-std", *map(str, preprocessor["image_std"]),
              *(["--use-f32"] if outtype == "f32" else [])], Path(tmp), env)
        written = dest / f"mmproj-model-{outtype}.gguf"
        shutil.move(written, out.with_suffix(".partial"))
    out.with_suffix(".partial").rename(out)
    return out
