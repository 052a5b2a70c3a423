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
    from edge_llm.generate import load

    eng = load(str(demo_path), n_ctx=4096, n_parallel=4)
    yield eng
    eng.close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, input: str | None = None):
    """Run `edge-llm ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_llm", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input, cwd=ROOT)


@pytest.fixture(scope="session")
def smollm2_hf_dir(demo_path, tmp_path_factory) -> Path:
    """The bundled SmolLM2 GGUF rebuilt as an HF checkpoint (float32 safetensors + tokenizer) by
    transformers' own GGUF loader: real weights for converter and engine tests, no download."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("smollm2-hf")
    kwargs = dict(gguf_file=demo_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_path.parent, **kwargs)
    # The weights are dequantized to float32 now; drop the GGUF "quantizer" so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
