"""llama-cpp-python's own high-level `Llama`, a code path apart from edge-llm's engine, as the tests'
independent reference (converter logits, perplexity, the mtmd probe)."""

from __future__ import annotations

from pathlib import Path


def reference_llama(model_path: str | Path, **kwargs):
    """llama-cpp-python's own `Llama`, a code path apart from edge-llm's engine, with the engine's one
    rule for the extra CPU buffer types (llama_runtime.extra_buffers): where the build runs AMX
    kernels they crash at the first decode (llama.cpp#20824), and `Llama` has no argument for it,
    so its default model parameters are adjusted while it loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    from edge_llm.engines.llama_runtime import extra_buffers, uses_amx

    if extra_buffers("auto", uses_amx()):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    default = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    finally:
        low_level.llama_model_default_params = default
