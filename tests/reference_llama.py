"""llama-cpp-python's own high-level `Llama`, a code path apart from edge-llm's engine, as the tests'
independent reference (converter logits, perplexity, the mtmd probe)."""

from __future__ import annotations

from pathlib import Path


def reference_llama(model_path: str | Path, **kwargs):
    """llama-cpp-python's own `Llama`, a code path apart from edge-llm's engine, in a process whose
    ggml backend was set up by the engine's one rule (llama_runtime.init_backend leaves the AMX
    weight buffers out: this llama.cpp's AMX kernels crash at the first decode, llama.cpp#20824).
    `Llama` has no argument for it; the rule edits the CPU backend's list of extra buffer types,
    which every later model load in the process reads."""
    import llama_cpp

    from edge_llm.engines.llama_runtime import init_backend

    init_backend()
    return llama_cpp.Llama(model_path=str(model_path), **kwargs)
