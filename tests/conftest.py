from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_path() -> Path:
    from edge_llm.registry import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def engine(demo_path):
    """One shared engine on the bundled model: 4 slots of 1024 tokens."""
    from edge_llm.api import load

    eng = load(str(demo_path), n_ctx=4096, n_parallel=4)
    yield eng
    eng.close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, input: str | None = None,
            preexec_fn=None):
    """Run `edge-llm ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_llm", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input, cwd=ROOT, preexec_fn=preexec_fn)


def _without_root_file_access() -> None:
    """In a child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set,
    so root's command is bound by file modes like anyone's (capabilities(7))."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture()
def read_only_folder(tmp_path):
    """(folder, run): a folder that `run(*args)` (run_cli's signature) cannot create files in; files
    the test puts there first stay readable. Mode 555 during `run`; when the tests run as root, the
    command runs without root's right to ignore file modes."""
    folder = tmp_path / "read-only"
    folder.mkdir()

    def run(*args: str, **kwargs):
        folder.chmod(0o555)
        try:
            return run_cli(*args, preexec_fn=_without_root_file_access if os.geteuid() == 0 else None, **kwargs)
        finally:
            folder.chmod(0o755)

    return folder, run


# -- clients of a live server --------------------------------------------------------------------------
# A server test module declares its live server, as `server` (yielding its base URL and app) or as
# `url`, and where answers come from a real model a longer `client_timeout`; these fixtures build
# the official clients over them.


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client_timeout() -> float:
    """Seconds a client waits for an answer: long enough for a fake engine, too short for a real model."""
    return 30


@pytest.fixture(scope="module")
def http(url, client_timeout):
    import httpx

    with httpx.Client(base_url=url, timeout=client_timeout) as client:
        yield client


@pytest.fixture(scope="module")
def oa(url, client_timeout):
    """The official OpenAI client."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=client_timeout)


@pytest.fixture(scope="module")
def claude(url, client_timeout):
    """The official Anthropic client."""
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=client_timeout)


@pytest.fixture(scope="module")
def llama(url, client_timeout):
    """The official Ollama client."""
    import ollama

    return ollama.Client(host=url, timeout=client_timeout)


@pytest.fixture(scope="session")
def smollm2_hf_dir(demo_path, tmp_path_factory) -> Path:
    """The bundled SmolLM2 GGUF rebuilt as an HF checkpoint (float32 safetensors + tokenizer) by
    transformers' own GGUF loader: real weights for converter and engine tests, no download. Made
    by the command docs/models.md gives for it (scripts/smollm2_checkpoint.py), as a user runs it."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2_checkpoint.py"), str(out),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    return out


@pytest.fixture(scope="session")
def hf_engine(smollm2_hf_dir):
    """The transformers engine on the rebuilt SmolLM2 checkpoint (float32, CPU), with a context of
    1024 tokens: the size of one llama.cpp slot in the `engine` fixture, so limits match."""
    pytest.importorskip("transformers", reason="the transformers engine needs the `hf` extra")
    from edge_llm.api import load

    eng = load(str(smollm2_hf_dir), engine="transformers", n_ctx=1024)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_hf_dir(smollm2_hf_dir, tmp_path_factory) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64) with the SmolLM2 tokenizer: fast engine tests."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
