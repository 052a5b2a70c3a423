"""Engines that need a GPU (or a vLLM build) to run: llama.cpp's CUDA offload and split modes,
vLLM and LMDeploy on the rebuilt SmolLM2 checkpoint. Each test skips, saying why, where its
engine or hardware is absent; where present, it checks the same behaviour as the CPU suite."""

import asyncio
import importlib.util

import pytest

from edge_llm.engines.base import collect, collect_async
from edge_llm.load_options import LoadOptions
from edge_llm.sampling import SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.slow]
GREEDY = dict(temperature=0.0)


def complete(engine, prompt, **kw):
    params = SamplingParams.create(**kw)
    return collect(engine.stream(prompt, params), params.n)


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _gpu_offload_build() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


needs_offload_build = pytest.mark.skipif(
    not _gpu_offload_build(), reason='llama-cpp-python is a CPU build (CMAKE_ARGS="-DGGML_CUDA=on" for CUDA)')


@needs_offload_build
def test_llamacpp_offload_is_really_active(demo_path, engine):
    from edge_llm.offload import gpu_devices, offload_report

    if not gpu_devices():
        pytest.skip("a GPU build of llama.cpp, but no GPU device is visible")
    report = offload_report(demo_path, LoadOptions(n_gpu_layers=-1, flash_attn="on"))
    assert report.active and report.layers_offloaded == report.layers_total == 31
    assert any(name.startswith(("CUDA", "ROCm", "Vulkan", "Metal")) and mib > 50
               for name, mib in report.model_buffers_mib.items())
    assert sum(report.vram_used_mib.values()) > 50
    from edge_llm.api import load

    gpu = load(str(demo_path), n_ctx=1024, n_parallel=1, n_gpu_layers=-1, flash_attn="on")
    try:
        on_gpu = complete(gpu, "The capital of France is", max_tokens=8, **GREEDY)[0]
        on_cpu = complete(engine, "The capital of France is", max_tokens=8, **GREEDY)[0]
        # Different kernels, same Q4_1 weights: the first tokens agree.
        assert on_gpu.token_ids[:4] == on_cpu.token_ids[:4]
    finally:
        gpu.close()


@needs_offload_build
@pytest.mark.parametrize("split_mode", ["layer", "row"])
def test_llamacpp_split_over_two_gpus(demo_path, split_mode):
    from edge_llm.offload import gpu_devices, offload_report

    gpus = gpu_devices()
    if len(gpus) < 2:
        pytest.skip(f"needs 2 GPUs, {len(gpus)} visible")
    report = offload_report(demo_path, LoadOptions(n_gpu_layers=-1, split_mode=split_mode, tensor_split=(1.0, 1.0)))
    used = [name for name, mib in report.model_buffers_mib.items() if not name.startswith("CPU") and mib > 1]
    assert report.active and len(used) >= 2, report


# -- vLLM and LMDeploy on the same checkpoint as the transformers engine -----------------------------


def _vllm_ready() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'edge-llm[vllm]')"
    return None


def _lmdeploy_ready() -> str | None:
    if importlib.util.find_spec("lmdeploy") is None:
        return "LMDeploy is not installed (pip install 'edge-llm[lmdeploy]')"
    if _cuda_devices() == 0:
        return "LMDeploy needs a CUDA GPU"
    return None


@pytest.fixture(scope="module", params=["vllm", "lmdeploy"])
def gpu_engine(request, smollm2_hf_dir):
    reason = {"vllm": _vllm_ready, "lmdeploy": _lmdeploy_ready}[request.param]()
    if reason:
        pytest.skip(reason)
    from edge_llm.api import load

    extra = {"enforce_eager": True} if request.param == "vllm" else {}
    eng = load(str(smollm2_hf_dir), engine=request.param, n_ctx=1024, dtype="float32" if _cuda_devices() == 0
               else "float16", gpu_memory_utilization=0.3 if _cuda_devices() else None, extra=extra)
    yield eng
    eng.close()


def test_gpu_engine_greedy_matches_transformers(gpu_engine, hf_engine):
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ours = complete(gpu_engine, prompt, max_tokens=8, ignore_eos=True, **GREEDY)[0]
        reference = complete(hf_engine, prompt, max_tokens=8, ignore_eos=True, **GREEDY)[0]
        assert ours.token_ids[:4] == reference.token_ids[:4], prompt
        assert ours.finish_reason == "length" and ours.usage.completion_tokens == 8
        assert ours.usage.prompt_tokens == len(hf_engine.tokenize(prompt))


def test_gpu_engine_stop_strings_seed_and_n(gpu_engine):
    free = complete(gpu_engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, **GREEDY)[0].text
    assert " 5," in free
    cut = complete(gpu_engine, "Count: 1, 2, 3,", max_tokens=20, stop=[" 5,"], **GREEDY)[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.index(" 5,")]
    kw = dict(max_tokens=16, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0)
    a = complete(gpu_engine, "Once upon a time", seed=7, **kw)[0].text
    assert a == complete(gpu_engine, "Once upon a time", seed=7, **kw)[0].text
    outs = complete(gpu_engine, "My favourite colour is", n=2, seed=3, **kw)
    assert all(o.finish_reason for o in outs) and outs[0].text != outs[1].text


def test_gpu_engine_logprobs_and_cancel(gpu_engine):
    out = complete(gpu_engine, "The capital of France is", max_tokens=4, logprobs=3, **GREEDY)[0]
    assert len(out.logprobs) == 4
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == token and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-2)

    async def run():
        stream = gpu_engine.generate("Once upon a time", SamplingParams.create(max_tokens=500, ignore_eos=True))
        got = [await stream.__anext__() for _ in range(2)]
        await stream.aclose()
        again = await collect_async(gpu_engine.generate("Hi", SamplingParams.create(max_tokens=3, **GREEDY)))
        return got, again

    got, again = asyncio.run(run())
    assert len(got) == 2 and again[0].finish_reason is not None


def test_gpu_engine_grammar_or_clear_refusal(gpu_engine):
    from edge_llm.errors import InvalidParameterError

    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    if gpu_engine.name == "lmdeploy":
        with pytest.raises(InvalidParameterError, match="grammar"):
            complete(gpu_engine, "Is the sky blue?", max_tokens=16, grammar=grammar)
        return
    for seed in (1, 2):
        out = complete(gpu_engine, "Is the sky blue?", max_tokens=16, temperature=1.0, seed=seed, grammar=grammar)[0]
        assert out.text in ("The answer is yes.", "The answer is no."), out.text
        assert out.finish_reason == "stop"


def test_gpu_engine_refuses_embeddings(gpu_engine):
    from edge_llm.errors import EdgeLLMError

    with pytest.raises(EdgeLLMError, match="embeddings"):
        gpu_engine.embed(["hello"])
