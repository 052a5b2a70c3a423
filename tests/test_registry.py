
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
