"""`edge-llm convert` on vision-language checkpoints: the projector GGUF (`mmproj-*.gguf`) and the
language model's GGUF against llama.cpp's own converters on tiny random checkpoints of each family
(tests/tiny_vision_models.py), both tensor layouts of Gemma 3, LLaVA and InternVL, llama.cpp's mtmd
running the result on images, the CLI's files and errors, and `edge-llm info` on a projector."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli
from llama_cpp_mmproj_reference import reference_llava_mmproj, reference_mmproj
from llama_cpp_reference import gguf_differences, reference_gguf
from tiny_models import build_tokenizers
from tiny_vision_models import VISION_FAMILIES

from edge_llm.convert import convert_checkpoint, convert_mmproj
from edge_llm.convert.mmproj import VISION_DEFAULTS

# One checkpoint per projector kind that mtmd runs (the other layouts give the same files, checked below).
RUNNABLE = ["gemma3", "smolvlm", "qwen2-vl", "qwen2.5-vl", "llava-1.5", "internvl"]


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory, demo_path):
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"), demo_path)


@pytest.fixture(scope="module")
def tiny_vision(tokenizers_dir, tmp_path_factory):
    """Each family's checkpoint, built once per module (no test changes it)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = VISION_FAMILIES[name].build(tmp_path_factory.mktemp(name) / name, tokenizers_dir)
        return built[name]

    return get


def _llama_cpp_projector(name: str, tiny_vision, outtype: str = "f16"):
    family = VISION_FAMILIES[name]
    folder = tiny_vision(family.reference or name).path
    return reference_llava_mmproj(folder, outtype) if family.projector == "mlp" else reference_mmproj(folder, outtype)


def _field(path, key):
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VISION_FAMILIES))
def test_same_files_as_llama_cpp(name, tiny_vision, tmp_path):
    """Both files of one conversion, against llama.cpp's: every tensor (name, type, shape, bytes) and
    every key mtmd / llama.cpp read. A layout llama.cpp's converter refuses (transformers 5's Gemma 3,
    InternVL's -hf release) is compared with llama.cpp's file for the same weights in the layout it reads."""
    family = VISION_FAMILIES[name]
    tiny = tiny_vision(name)
    done = convert_checkpoint(tiny.path, tmp_path, "f16")
    assert (done.text.name, done.mmproj.name) == (f"{name}-f16.gguf", f"mmproj-{name}-f16.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([done.text.name, done.mmproj.name])
    expected = {key: what for key, (what, _why) in family.differences.items()}
    assert gguf_differences(_llama_cpp_projector(name, tiny_vision), done.mmproj) == expected
    assert _field(done.mmproj, "clip.projector_type") == family.projector
    assert _field(done.mmproj, "general.type") == "mmproj"
    if family.reference is None:
        assert gguf_differences(reference_gguf(tiny.path, "f16", pre=family.pre), done.text) == {}
    else:  # the same language model as the reference layout's, whose file is checked against llama.cpp's
        same = convert_checkpoint(tiny_vision(family.reference).path, tmp_path / "ref.gguf", "f16", mmproj=False)
        assert gguf_differences(same.text, done.text) == {}
    if family.refusal:  # why both layouts are read here: llama.cpp's converter takes only one
        with pytest.raises(RuntimeError, match=re.escape(family.refusal)):
            reference_mmproj(tiny.path)


@pytest.mark.slow
@pytest.mark.parametrize("name,outtype", [("gemma3", "q8_0"), ("gemma3", "f32"), ("qwen2.5-vl", "bf16"),
                                          ("qwen2-vl", "f32"), ("internvl-hf", "q8_0"), ("llava-1.5", "f32")])
def test_projector_types_as_llama_cpp(name, outtype, tiny_vision, tmp_path):
    """The per-tensor type rules at other output types: Gemma 3's input projection F16 in any file,
    patch embeddings F16 only in f16 files, Q8_0 falling back to F16 for rows Q8_0 cannot split, and
    the legacy LLaVA format's F16 matrices in an f32 file."""
    family = VISION_FAMILIES[name]
    ours = convert_mmproj(tiny_vision(name).path, tmp_path / "p.gguf", outtype)
    expected = {key: what for key, (what, _why) in family.differences.items()}
    assert gguf_differences(_llama_cpp_projector(name, tiny_vision, outtype), ours) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_mtmd_runs_the_converted_files(name, tiny_vision, tmp_path):
    """llama.cpp's mtmd (the pinned llama-cpp-python's bindings, in a child process) loads our text
    GGUF and projector, cuts two images into the image tokens the model expects, and the logits after
    them differ: the image reached the language model."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    images = []
    for i, (w, h) in enumerate([(60, 40), (48, 64)]):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype="uint8")).save(images[-1])
    (tmp_path / "out").mkdir()
    done = convert_checkpoint(tiny_vision(name).path, tmp_path / "out", "f16")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "mtmd_probe.py"), str(done.text), str(done.mmproj),
                          *map(str, images)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = json.loads(out.stdout.strip().splitlines()[-1])["images"]
    for result in (first, second):
        image_chunks = [n for kind, n in result["chunks"] if kind == "image"]
        assert image_chunks and result["finite"], result
        if VISION_FAMILIES[name].tokens_per_tile is not None:
            assert set(image_chunks) == {VISION_FAMILIES[name].tokens_per_tile}, result
    assert first["checksum"] != second["checksum"]


@pytest.mark.slow
def test_cli_writes_both_files_and_each_alone(tiny_vision, tmp_path):
    tiny = tiny_vision("gemma3")
    (tmp_path / "a").mkdir()
    out = run_cli("convert", str(tiny.path), "-o", str(tmp_path / "a"), "--quant", "q4_k_m")
    assert out.returncode == 0, out.stderr
    text, mmproj = tmp_path / "a" / "gemma3-q4_k_m.gguf", tmp_path / "a" / "mmproj-gemma3-f16.gguf"
    assert out.stdout.splitlines() == [str(text), str(mmproj)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [text.name, mmproj.name]
    assert _field(text, "general.file_type") == 15  # MOSTLY_Q4_K_M: the language model is quantized...
    assert _field(mmproj, "general.file_type") == 1  # ...the projector stays f16, as llama.cpp ships them

    out = run_cli("convert", str(tiny.path), "-o", str(tmp_path / "lm.gguf"), "--no-mmproj")
    assert out.returncode == 0 and out.stdout.splitlines() == [str(tmp_path / "lm.gguf")], out.stderr
    out = run_cli("convert", str(tiny.path), "--mmproj-only", "-o", str(tmp_path / "p.gguf"), "--outtype", "f32")
    assert out.returncode == 0 and out.stdout.splitlines() == [str(tmp_path / "p.gguf")], out.stderr
    assert _field(tmp_path / "p.gguf", "general.type") == "mmproj"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "lm.gguf", "p.gguf"]


def _assert_one_line_error(out, fragment, folder):
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert fragment in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert not list(folder.iterdir()), "an output or temporary file was left behind"


@pytest.mark.slow
def test_bad_vision_checkpoints(tiny_vision, tmp_path):
    """One line, exit 1, and neither file written: the projector is planned (and checked) first."""
    from safetensors.numpy import load_file, save_file

    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def damaged(name: str):
        folder = tmp_path / name
        shutil.copytree(tiny_vision("qwen2.5-vl").path, folder)
        return folder

    folder = damaged("missing-block")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("visual.blocks.3.")},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    _assert_one_line_error(run_cli("convert", str(folder), "-o", str(out_dir)), "vision half is incomplete: no v.blk.3",
                           out_dir)

    folder = damaged("no-preprocessor")
    (folder / "preprocessor_config.json").unlink()
    _assert_one_line_error(run_cli("convert", str(folder), "-o", str(out_dir)), "needs a 3-value image_mean", out_dir)

    folder = damaged("unknown-vision")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyVLForConditionalGeneration"]
    config["text_config"]["architectures"] = ["Qwen2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(run_cli("convert", str(folder), "-o", str(out_dir)),
                           "no projector converter for architecture FancyVLForConditionalGeneration", out_dir)
    out = run_cli("convert", str(folder), "-o", str(out_dir), "--no-mmproj")  # the language model alone converts
    assert out.returncode == 0, out.stderr
    assert [p.name for p in out_dir.iterdir()] == ["unknown-vision-f16.gguf"]
    (out_dir / "unknown-vision-f16.gguf").unlink()

    config.pop("vision_config")
    (folder / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(run_cli("convert", str(folder), "-o", str(out_dir / "p.gguf"), "--mmproj-only"),
                           "no vision_config", out_dir)


@pytest.mark.slow
def test_hub_config_leaves_vision_defaults_out(tiny_vision, tmp_path):
    """Hub configs leave vision settings at transformers' defaults (llama.cpp's converter reads them
    through transformers, which fills them in): the same projector with the defaults left out."""
    from gguf import GGUFReader

    tiny = tiny_vision("qwen2.5-vl")
    hub = tmp_path / "hub"
    shutil.copytree(tiny.path, hub)
    config = json.loads((hub / "config.json").read_text())
    defaults = VISION_DEFAULTS[config["vision_config"]["model_type"]]
    dropped = {k for k, v in config["vision_config"].items() if defaults.get(k, object()) == v}
    assert {"patch_size", "hidden_act"} <= dropped
    config["vision_config"] = {k: v for k, v in config["vision_config"].items() if k not in dropped}
    (hub / "config.json").write_text(json.dumps(config))

    def keys(path):
        return {f.name: f.contents() for f in GGUFReader(path).fields.values()
                if not f.name.startswith(("GGUF.", "general.name"))}  # the name is the folder's

    assert keys(convert_mmproj(hub, tmp_path / "hub.gguf")) == keys(convert_mmproj(tiny.path, tmp_path / "full.gguf"))


def test_vision_defaults_are_transformers():
    import transformers

    classes = {"siglip_vision_model": transformers.SiglipVisionConfig, "idefics3_vision": transformers.Idefics3VisionConfig,
               "smolvlm_vision": transformers.SmolVLMVisionConfig, "qwen2_vl_vision": transformers.Qwen2VLVisionConfig,
               "qwen2_5_vl_vision": transformers.Qwen2_5_VLVisionConfig, "clip_vision_model": transformers.CLIPVisionConfig,
               "internvl_vision": transformers.InternVLVisionConfig}
    assert set(classes) == set(VISION_DEFAULTS)
    for model_type, cls in classes.items():
        full = cls().to_dict()
        assert full["model_type"] == model_type
        assert {k: full[k] for k in VISION_DEFAULTS[model_type]} == VISION_DEFAULTS[model_type], model_type


@pytest.mark.slow
def test_info_on_a_projector(tiny_vision, tmp_path):
    done = convert_checkpoint(tiny_vision("smolvlm").path, tmp_path, "f16")
    out = run_cli("info", str(done.mmproj), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["kind"], info["architecture"], info["projector"]) == ("mmproj", "clip", "idefics3")
    assert (info["image_size"], info["patch_size"], info["projection_dim"], info["n_layers"]) == (32, 8, 64, 2)
    text = run_cli("info", str(done.mmproj)).stdout
    assert "vision projector (mmproj)" in text and "idefics3" in text and "vocabulary" not in text
    model = json.loads(run_cli("info", str(done.text), "--json").stdout)
    assert (model["kind"], model["projector"]) == ("model", None)
