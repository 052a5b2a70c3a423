"""Fast checks, no model: how options and sampling parameters map onto each engine, what each
engine refuses, the torch sampling chain, token bytes, and llama.cpp's load-log parsing."""

import argparse
import json
import math

import pytest

from edge_llm.engines.base import engine_class
from edge_llm.errors import InvalidParameterError, MissingExtraError
from edge_llm.load_options import LoadOptions
from edge_llm.sampling import SamplingParams
from tests.conftest import run_cli


def test_cli_flags_reach_load_options():
    from edge_llm.options import add_model_flags, load_options

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    args = parser.parse_args(["-ngl", "-1", "-fa", "-sm", "row", "-ts", "3,1", "-mg", "1", "--tp", "2",
                              "--gpu-memory-utilization", "0.8", "--max-model-len", "8192", "--quantization", "awq",
                              "--dtype", "float16", "--distributed-executor-backend", "ray", "--pp", "2"])
    options = load_options(args)
    assert (options.n_gpu_layers, options.flash_attn, options.split_mode, options.tensor_split) == (-1, "on", "row",
                                                                                                     (3.0, 1.0))
    assert (options.main_gpu, options.tensor_parallel_size, options.pipeline_parallel_size) == (1, 2, 2)
    assert (options.gpu_memory_utilization, options.n_ctx, options.quantization, options.dtype) == (0.8, 8192, "awq",
                                                                                                    "float16")
    assert options.distributed_executor_backend == "ray" and options.extra is None
    extra = load_options(parser.parse_args(["--engine-arg", "enforce_eager=true", "--engine-arg", "backend=pytorch",
                                            "--engine-arg", "max-num-seqs=8"])).extra
    assert extra == {"enforce_eager": True, "backend": "pytorch", "max_num_seqs": 8}
    with pytest.raises(SystemExit):
        parser.parse_args(["-ts", "3,x"])


def test_tensor_split_array_for_llamacpp():
    import llama_cpp

    from edge_llm.engines.llama_runtime import tensor_split_array

    array = tensor_split_array((3.0, 1.0))
    assert len(array) == llama_cpp.llama_max_devices()
    assert list(array[:3]) == [3.0, 1.0, 0.0]
    with pytest.raises(InvalidParameterError, match="tensor-split"):
        tensor_split_array((0.0, 0.0))
    with pytest.raises(InvalidParameterError, match="tensor-split"):
        tensor_split_array(tuple([1.0] * (llama_cpp.llama_max_devices() + 1)))


@pytest.mark.model
def test_the_default_load_generates_on_this_cpu(demo_path):
    """On an AMX machine the default load used to crash at the first decode (llama.cpp#20824):
    AMX's weight buffers are left out at backend init (llama_runtime.leave_out_amx)."""
    out = run_cli("generate", "-m", str(demo_path), "-p", "The capital of France is", "-n", "4", "--temp", "0")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-500:]


def test_llamacpp_accepts_split_options_on_cpu(demo_path):
    """On a CPU build the split settings are accepted and change nothing (no GPU to split over)."""
    from edge_llm.api import load

    eng = load(str(demo_path), n_ctx=256, n_parallel=1, split_mode="none", tensor_split=(1.0,), main_gpu=0)
    try:
        assert eng.tokenize("hello")
    finally:
        eng.close()


def test_vllm_engine_args_and_refusals(tmp_path):
    from edge_llm.engines.vllm import engine_args, vllm_sampling_kwargs

    args = engine_args(tmp_path, LoadOptions(tensor_parallel_size=4, gpu_memory_utilization=0.85,
                                             quantization="awq", dtype="float16", cache_type_k="fp8",
                                             cache_type_v="fp8", distributed_executor_backend="ray",
                                             pipeline_parallel_size=2).resolve(), 8192)
    assert args["tensor_parallel_size"] == 4 and args["pipeline_parallel_size"] == 2
    assert args["max_model_len"] == 8192 and args["gpu_memory_utilization"] == 0.85
    assert args["quantization"] == "awq" and args["kv_cache_dtype"] == "fp8"
    assert args["distributed_executor_backend"] == "ray" and args["trust_remote_code"] is False
    with pytest.raises(InvalidParameterError, match="KV cache"):
        engine_args(tmp_path, LoadOptions(cache_type_k="q4_0", cache_type_v="q4_0").resolve(), None)
    with pytest.raises(InvalidParameterError, match="ngl"):
        engine_args(tmp_path, LoadOptions(n_gpu_layers=10).resolve(), None)
    with pytest.raises(InvalidParameterError, match="split"):
        engine_args(tmp_path, LoadOptions(tensor_split=(1.0, 1.0)).resolve(), None)

    kwargs = vllm_sampling_kwargs(SamplingParams.create(n=3, temperature=0.7, top_k=20, stop=["\n"], seed=5,
                                                        logprobs=2, repetition_penalty=1.1))
    assert kwargs["n"] == 3 and kwargs["top_k"] == 20 and kwargs["stop"] == ["\n"] and kwargs["seed"] == 5
    assert kwargs["logprobs"] == 2 and kwargs["repetition_penalty"] == 1.1
    with pytest.raises(InvalidParameterError, match="penalty_last_n"):
        vllm_sampling_kwargs(SamplingParams.create(repetition_penalty=1.1, penalty_last_n=32))


def test_lmdeploy_config_and_refusals():
    from edge_llm.engines.lmdeploy import backend_config, gen_config_kwargs

    backend, config = backend_config(LoadOptions(tensor_parallel_size=2, cache_type_k="q8_0", cache_type_v="q8_0",
                                                 quantization="awq", gpu_memory_utilization=0.5).resolve(), 4096)
    assert backend == "turbomind"
    assert config == {"tp": 2, "quant_policy": 8, "session_len": 4096, "cache_max_entry_count": 0.5,
                      "model_format": "awq"}
    assert backend_config(LoadOptions(extra={"backend": "pytorch"}).resolve(), None)[0] == "pytorch"
    with pytest.raises(InvalidParameterError, match="same value"):
        backend_config(LoadOptions(cache_type_k="q8_0").resolve(), None)
    with pytest.raises(InvalidParameterError, match="vLLM options"):
        backend_config(LoadOptions(pipeline_parallel_size=2).resolve(), None)

    kwargs = gen_config_kwargs(SamplingParams.create(temperature=0, max_tokens=9, stop_token_ids=[7]), [2], 3)
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 9 and kwargs["stop_token_ids"] == [7, 2]
    assert kwargs["random_seed"] == 3
    with pytest.raises(InvalidParameterError, match="presence"):
        gen_config_kwargs(SamplingParams.create(presence_penalty=0.5), [2], None)
    with pytest.raises(InvalidParameterError, match="grammar"):
        gen_config_kwargs(SamplingParams.create(grammar='root ::= "a"'), [2], None)


@pytest.mark.parametrize("name,module", [("vllm", "vllm"), ("lmdeploy", "lmdeploy")])
def test_missing_engine_names_its_extra(name, module, tmp_path):
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed here")
    (tmp_path / "config.json").write_text("{}")
    from edge_llm.registry import resolve

    with pytest.raises(MissingExtraError, match=f"edge-llm\\[{name}\\]"):
        engine_class(name)(resolve(str(tmp_path), {}), LoadOptions())


def test_load_log_parsing():
    from edge_llm.offload import parse_load_log

    log = ("load_tensors: offloading 30 repeating layers to GPU\nload_tensors: offloaded 31/31 layers to GPU\n"
           "load_tensors:        CUDA0 model buffer size =    80.50 MiB\n"
           "load_tensors:        CUDA1 model buffer size =    40.25 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =    11.60 MiB\n")
    assert parse_load_log(log) == (31, 31, {"CUDA0": 80.5, "CUDA1": 40.25, "CPU_Mapped": 11.6})
    assert parse_load_log("load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n") == (0, 0,
                                                                                            {"CPU_Mapped": 92.1})


def test_backend_devices_include_the_cpu():
    from edge_llm.offload import backend_devices

    devices = backend_devices()
    assert any(d.type == "cpu" for d in devices)
    assert all(d.total_mib >= d.free_mib >= 0 for d in devices)


# -- option resolution: flag / API argument > registry entry > built-in default -------------------


def _registry_entry(tmp_path, demo_path, **settings):
    """A models.toml with one entry, `mine`, on the bundled model, carrying these load settings."""
    lines = ["[models.mine]", 'source = "local"', f"path = {json.dumps(str(demo_path))}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    cfg = tmp_path / "models.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


@pytest.mark.model
def test_registry_gpu_layers_and_flash_attn_apply_through_the_api(tmp_path, demo_path):
    import edge_llm

    cfg = _registry_entry(tmp_path, demo_path, n_gpu_layers=-1, flash_attn="off", n_ctx=512)
    engine = edge_llm.load("mine", config=str(cfg), n_parallel=1)
    try:
        assert (engine.n_gpu_layers, engine.flash_attn, engine.n_ctx) == (-1, "off", 512)
    finally:
        engine.close()
    engine = edge_llm.load("mine", config=str(cfg), n_parallel=1, n_gpu_layers=0, flash_attn="auto")
    try:
        assert (engine.n_gpu_layers, engine.flash_attn, engine.n_ctx) == (0, "auto", 512)
    finally:
        engine.close()


@pytest.mark.model
def test_registry_sampling_defaults_apply_below_the_request(tmp_path, demo_path):
    import edge_llm

    cfg = _registry_entry(tmp_path, demo_path, temperature=0, n_ctx=512)
    engine = edge_llm.load("mine", config=str(cfg), n_parallel=1)
    try:
        prompt = "Once upon a time"
        # The entry makes sampling greedy: the seed changes nothing, as with an explicit temperature 0.
        greedy = {edge_llm.generate(engine, prompt, max_tokens=24, seed=seed) for seed in (1, 2, 3)}
        assert greedy == {edge_llm.generate(engine, prompt, max_tokens=24, temperature=0)}
        # A caller's own temperature outranks the entry's.
        hot = {edge_llm.generate(engine, prompt, max_tokens=24, seed=seed, temperature=1.5) for seed in (1, 2, 3)}
        assert len(hot) > 1
    finally:
        engine.close()


@pytest.mark.model
def test_registry_settings_apply_through_the_cli(tmp_path, demo_path, monkeypatch):
    from edge_llm.commands import generate as generate_command
    from edge_llm.engines.base import load_engine

    cfg = _registry_entry(tmp_path, demo_path, n_gpu_layers=-1, flash_attn="off", n_ctx=512)
    loaded = []

    def keep(*args, **kwargs):
        loaded.append(load_engine(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(generate_command, "load_engine", keep)
    assert generate_command.main(["-m", "mine", "--config", str(cfg), "-p", "Hi", "-n", "1"]) == 0
    assert (loaded[-1].n_gpu_layers, loaded[-1].flash_attn, loaded[-1].n_ctx) == (-1, "off", 512)
    assert generate_command.main(["-m", "mine", "--config", str(cfg), "-p", "Hi", "-n", "1", "-ngl", "0", "-fa"]) == 0
    assert (loaded[-1].n_gpu_layers, loaded[-1].flash_attn) == (0, "on")
    # As a user sees it: the entry's flash_attn = "off" refuses a quantized V cache unless -fa says otherwise.
    out = run_cli("generate", "-m", "mine", "--config", str(cfg), "-p", "Hi", "-n", "1", "-ctv", "q8_0")
    assert out.returncode == 1 and "quantized V cache (-ctv) needs flash attention" in out.stderr, out.stderr
    out = run_cli("generate", "-m", "mine", "--config", str(cfg), "-p", "Hi", "-n", "1", "-ctv", "q8_0", "-fa", "on")
    assert out.returncode == 0, out.stderr


@pytest.mark.model
def test_registry_prefixes_apply_to_chat_with_a_prompt_file(tmp_path, demo_path):
    """`chat -f` is prefix mode; the entry's in_prefix / in_suffix must frame each user turn."""
    cfg = _registry_entry(tmp_path, demo_path, in_prefix="\nUser-Turn: ", in_suffix="\nBot-Turn:")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A conversation.\n", encoding="utf-8")
    out = run_cli("chat", "-m", "mine", "--config", str(cfg), "-f", str(prompt), "-n", "4", "--temp", "0",
                  "--verbose-prompt", input="hello\n")
    assert out.returncode == 0, out.stderr
    assert "User-Turn: hello" in out.stderr and "Bot-Turn:" in out.stderr, out.stderr


# -- the transformers engine's sampling chain and token bytes ---------------------------------------


torch = pytest.importorskip("torch", reason="the sampling chain of the transformers engine needs torch")


def sampler(**kw):
    from edge_llm.engines.torch_sampling import TokenSampler

    prompt = kw.pop("prompt", [])
    return TokenSampler(SamplingParams.create(**kw), prompt, eog_ids=[0], seed=kw.get("seed") or 0, n_ctx=64)


def test_penalties_follow_vllm_meaning_in_llamacpp_window():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    s = sampler(temperature=0, repetition_penalty=2.0, prompt=[0, 1], penalty_last_n=-1)
    out = logits.clone()
    s._apply_penalties(out)
    assert out.tolist() == [1.0, -4.0, 1.0, 1.0]  # positive logits divided, negative multiplied
    s = sampler(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, prompt=[3])
    for t in (2, 2, 3):
        s.accept(t)
    out = logits.clone()
    s._apply_penalties(out)
    # Output tokens only: token 2 twice (0.5 + 2 * 0.25), token 3 once (0.5 + 0.25); the prompt's 3 does not count.
    assert out.tolist() == [2.0, -2.0, 0.0, 0.25]
    s = sampler(temperature=0, repetition_penalty=2.0, prompt=[0, 1, 2, 3], penalty_last_n=2)
    out = logits.clone()
    s._apply_penalties(out)
    assert out.tolist() == [2.0, -2.0, 0.5, 0.5]  # only the last 2 tokens are in the window


def test_truncation_chain():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = lambda s: {s.sample(logits) for _ in range(300)}  # noqa: E731
    assert draws(sampler(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=1)) == {0, 1}
    assert draws(sampler(temperature=1.0, top_k=-1, top_p=0.7, min_p=0.0, seed=1)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(sampler(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.25, seed=1)) == {0, 1, 2}  # >= 0.125
    assert draws(sampler(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=1)) == {0, 1, 2, 3}
    assert sampler(temperature=0.0).sample(logits) == 0
    assert sampler(temperature=0.0, ignore_eos=True).sample(logits) == 1  # token 0 is end-of-generation here


def test_temperature_sharpens_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.4]))
    cold = sampler(temperature=0.1, top_k=-1, top_p=1.0, min_p=0.0, seed=3)
    picks = [cold.sample(logits) for _ in range(400)]
    # p(0) at T=0.1 is 0.6^10 / (0.6^10 + 0.4^10) = 0.983
    assert picks.count(0) / len(picks) > 0.95
    warm = sampler(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=3)
    share = [warm.sample(logits) for _ in range(2000)].count(0) / 2000
    assert math.isclose(share, 0.6, abs_tol=0.05)


def test_byte_level_alphabet_round_trips_every_byte():
    from edge_llm.engines.hf_tokens import byte_level_alphabet

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == 32 and alphabet["A"] == 65
