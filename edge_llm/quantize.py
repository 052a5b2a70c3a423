"""GGUF -> quantized GGUF through llama.cpp's own quantizer (`llama_model_quantize`, the code
behind `llama-quantize`), so the output is byte-for-byte what llama-quantize writes."""

from __future__ import annotations

import os
from pathlib import Path

from edge_llm.errors import EdgeLLMError, InvalidParameterError


def quant_types() -> dict[str, int]:
    """Quant name (lower case, as llama-quantize spells it) -> llama_ftype."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):].lower(): getattr(llama_cpp, name) for name in dir(llama_cpp)
             if name.startswith(prefix)}
    types["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return types


def quantize_file(src: str | Path, dst: str | Path, qtype: str, *, threads: int | None = None,
                  allow_requantize: bool = False, verbose: bool = False) -> Path:
    """Quantize `src` into `dst`. The output is written to a temporary name in the target folder
    and renamed when complete, so a failure never leaves a half file under `dst`."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    from edge_llm.engines.llamacpp import _init_backend, check_gguf_file

    src, dst = Path(src), Path(dst)
    types = quant_types()
    ftype = types.get(qtype.lower())
    if ftype is None:
        raise InvalidParameterError(f"unknown quant type {qtype!r}; choose from {', '.join(sorted(types))}",
                                    param="type")
    if not src.is_file():
        raise EdgeLLMError(f"input file not found: {src}")
    check_gguf_file(src)
    set_verbose(verbose)  # llama.cpp logs every tensor otherwise
    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    params.allow_requantize = allow_requantize
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if status != 0:
            raise EdgeLLMError(f"llama.cpp could not quantize {src} to {qtype} (status {status}; "
                               "run with -v for llama.cpp's log)")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
