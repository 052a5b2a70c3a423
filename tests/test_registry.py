
import pytest

from edge_llm import hub
from edge_llm.errors import EdgeLLMError, InvalidParameterError, ModelNotFoundError
from edge_llm.registry import load_registry, resolve

EXPECTED_FAMILIES = ["smollm2-135m", "qwen2-7b", "qwen2.5-7b", "qwen1.5-7b", "qwen2-72b", "llama2-7b",
                     "llama3-8b", "mistral-7b", "baichuan2-7b", "internlm2-7b", "chatglm3-6b",
                     "codellama-34b", "yuan2-2b"]


def test_builtin_registry_is_valid_and_complete():
    specs = load_registry()
    for name in EXPECTED_FAMILIES:
        assert name in specs, name
        assert specs[name].engines
    assert specs["qwen2-7b"].quant == "q5_k_m"
    assert specs["yuan2-2b"].engines == ["vllm"]  # GPU-only


def test_user_config_overrides_and_validates(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models.mine]\nsource = "local"\npath = "m.gguf"\nchat_format = "chatml"\n')
    specs = load_registry(cfg)
    assert "mine" in specs and "qwen2-7b" in specs
    resolved = resolve("mine", specs)
    assert resolved.path == gguf.resolve()

    cfg.write_text('[models.bad]\nsource = "hf"\n')
    with pytest.raises(EdgeLLMError, match="bad.*needs `repo`"):
        load_registry(cfg)
    cfg.write_text('[models.bad]\nsource = "local"\npath = "x"\nn_ctx = "big"\n')
    with pytest.raises(EdgeLLMError, match="n_ctx"):
        load_registry(cfg)
    cfg.write_text("not toml [")
    with pytest.raises(EdgeLLMError, match="not valid TOML"):
        load_registry(cfg)


def test_the_builtin_registry_is_the_top_level_models_toml():
    """One built-in registry, at the repository's top level; none inside the package of a checkout
    (a wheel carries it there: test_the_wheel_carries_the_registry)."""
    from conftest import ROOT

    from edge_llm import registry

    assert registry.BUILTIN_REGISTRY.samefile(ROOT / "models.toml")
    assert not (ROOT / "edge_llm" / "models.toml").exists()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_models_toml_in_the_current_folder_sits_between_builtin_and_config(tmp_path, monkeypatch):
    """Precedence, lowest first: built-in < ./models.toml < --config; each adds entries and replaces
    those of the same name."""
    here = tmp_path / "project"
    _write(here / "models.toml", '[models.qwen2-7b]\nsource = "local"\npath = "q.gguf"\n'
                                 '[models.mine]\nsource = "local"\npath = "mine.gguf"\nchat_format = "chatml"\n'
                                 '[models.only-here]\nsource = "local"\npath = "o.gguf"\n')
    monkeypatch.chdir(here)
    specs = load_registry()
    assert specs["qwen2-7b"].source == "local" and specs["qwen2-7b"].path == str(here / "q.gguf")  # over built-in
    assert specs["mine"].chat_format == "chatml" and "llama3-8b" in specs  # built-in entries stay

    config = _write(tmp_path / "elsewhere" / "models.toml",
                    '[models.mine]\nsource = "local"\npath = "mine.gguf"\nchat_format = "llama3"\n')
    specs = load_registry(config)
    assert specs["mine"].chat_format == "llama3" and specs["mine"].path == str(config.parent / "mine.gguf")
    assert "only-here" in specs and specs["qwen2-7b"].source == "local"  # ./models.toml still read

    # --config naming ./models.toml itself reads it once, as --config.
    assert load_registry("models.toml")["mine"].chat_format == "chatml"


def test_a_bad_models_toml_in_the_current_folder_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from edge_llm.cli import main

    monkeypatch.chdir(tmp_path)
    local = tmp_path / "models.toml"
    for text, why in [("not toml [", "not valid TOML"), ('[models.x]\nsource = "hf"\n', "model 'x': source = 'hf' needs `repo`"),
                      ("models = 3\n", "`models` must be a table")]:
        local.write_text(text)
        with pytest.raises(EdgeLLMError) as caught:
            load_registry()
        message = caught.value.message
        assert message.startswith(f"{local} (the current folder's models.toml): ") and why in message, message
        assert main(["models"]) == 1
        err = capsys.readouterr().err
        assert err.splitlines() == [f"edge-llm models: error: {message}"], err


@pytest.mark.slow
def test_the_wheel_carries_the_registry(tmp_path):
    """A wheel built from this checkout holds the top-level models.toml as edge_llm/models.toml, and
    the package installed from it reads its registry there (without importing llama_cpp)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside its sources
    shutil.copytree(ROOT / "edge_llm", source / "edge_llm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "models.toml"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheels"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "wheels").glob("edge_llm-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("edge_llm/models.toml") == (ROOT / "models.toml").read_bytes()
        assert not [n for n in archive.namelist() if n.endswith("models.toml") and n != "edge_llm/models.toml"]
        archive.extractall(tmp_path / "installed")
    code = ("import sys; from edge_llm import registry; "
            "print(registry.BUILTIN_REGISTRY); print(len(registry.load_registry())); print('llama_cpp' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    where, count, llama_cpp = ran.stdout.split()
    assert where == str(tmp_path / "installed" / "edge_llm" / "models.toml")
    assert int(count) == len(load_registry()) and llama_cpp == "False"


def test_parse_hub_ref():
    ref = hub.parse_hub_ref("hf:Qwen/Qwen2-7B-Instruct-GGUF:Q5_K_M")
    assert (ref.source, ref.repo, ref.quant, ref.file) == ("hf", "Qwen/Qwen2-7B-Instruct-GGUF", "q5_k_m", None)
    ref = hub.parse_hub_ref("ms:qwen/Qwen2-7B-Instruct-GGUF:qwen2-7b-instruct-q8_0.gguf@v1")
    assert (ref.source, ref.file, ref.revision) == ("modelscope", "qwen2-7b-instruct-q8_0.gguf", "v1")
    with pytest.raises(InvalidParameterError, match="ORG/NAME"):
        hub.parse_hub_ref("hf:justaname")


def test_pick_gguf_by_quant_prefers_first_shard():
    files = ["a-q4_k_m.gguf", "a-q5_k_m.gguf", "a-q5_k_m-00002-of-00002.gguf", "README.md"]
    assert hub.pick_gguf(files, "q5_k_m") == "a-q5_k_m.gguf"
    assert hub.pick_gguf(["B.Q5_K_M-00001-of-00002.gguf", "B.Q5_K_M-00002-of-00002.gguf"], "q5_k_m") \
        == "B.Q5_K_M-00001-of-00002.gguf"
    assert hub.pick_gguf(files, "q8_0") is None


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--Qwen--Qwen2-7B-Instruct-GGUF"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "qwen2-7b-instruct-q5_k_m.gguf").write_bytes(b"GGUF")
    return snap


def test_hub_ref_and_registry_name_resolve_from_cache(hf_cache):
    resolved = resolve("hf:Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m")
    assert resolved.path == hf_cache / "qwen2-7b-instruct-q5_k_m.gguf"
    assert resolve("qwen2-7b").path == resolved.path


def test_missing_downloads_name_the_pull_command(hf_cache):
    with pytest.raises(ModelNotFoundError, match=r"run: edge-llm pull hf:Qwen/Qwen2-7B-Instruct-GGUF:q8_0"):
        resolve("hf:Qwen/Qwen2-7B-Instruct-GGUF:q8_0")
    with pytest.raises(ModelNotFoundError, match="run: edge-llm pull llama3-8b"):
        resolve("llama3-8b")


def test_paths_and_unknown_names(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model file not found: .*nope.gguf"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="unknown model 'nosuchmodel'"):
        resolve("nosuchmodel")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)).spec.format == "hf"


def test_default_is_the_demo_model(demo_path):
    resolved = resolve(None)
    assert resolved.name == "smollm2-135m"
    assert resolved.path == demo_path
    assert demo_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and demo_path.stat().st_size > 50e6
