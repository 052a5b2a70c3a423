"""GPU devices and layer offload as llama.cpp sees them, for `edge-llm doctor`.

"-ngl 99 was given" is not "the layers are on the GPU": a CPU-only build of llama-cpp-python
accepts -ngl and silently keeps everything on the CPU. So this module asks llama.cpp itself:
  - the ggml backend devices (names, type, free / total memory), through ggml's C API, which
    llama-cpp-python does not bind (ctypes on its own libggml);
  - for a model loaded with -ngl N, llama.cpp's own load report ("offloaded 31/31 layers to
    GPU", the model buffer per device), captured from its log, and the device memory that the
    load took (free memory before minus after).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB")


@dataclass
class Device:
    index: int
    name: str
    description: str
    type: str
    free_mib: int
    total_mib: int


@dataclass
class OffloadReport:
    n_gpu_layers: int  # as requested (-1 = all)
    layers_offloaded: int  # as llama.cpp reports it after loading
    layers_total: int
    model_buffers_mib: dict[str, float] = field(default_factory=dict)  # device -> weights on it
    vram_used_mib: dict[str, int] = field(default_factory=dict)  # GPU device -> memory the load took

    @property
    def active(self) -> bool:
        return self.layers_offloaded > 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}


def _ggml_libraries() -> tuple[Any, Any] | None:
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    try:
        registry = ctypes.CDLL(str(next(folder.glob("libggml.so*"), folder / "libggml.so")))
        base = ctypes.CDLL(str(next(folder.glob("libggml-base.so*"), folder / "libggml-base.so")))
    except OSError:
        return None
    if not hasattr(registry, "ggml_backend_dev_count"):
        return None
    registry.ggml_backend_dev_count.restype = ctypes.c_size_t
    registry.ggml_backend_dev_get.restype = ctypes.c_void_p
    registry.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, name).restype = ctypes.c_char_p
        getattr(base, name).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    return registry, base


def backend_devices() -> list[Device]:
    """Every ggml backend device of this llama-cpp-python build (the CPU is one of them)."""
    from edge_llm.engines.llama_runtime import init_backend

    init_backend()  # loads the dynamic backends, so the device list is complete
    libs = _ggml_libraries()
    if libs is None:
        return []
    registry, base = libs
    devices = []
    for i in range(registry.ggml_backend_dev_count()):
        dev = registry.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(i, base.ggml_backend_dev_name(dev).decode(errors="replace"),
                              (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                              DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
                              free.value >> 20, total.value >> 20))
    return devices


def gpu_devices() -> list[Device]:
    return [d for d in backend_devices() if d.type != "cpu"]


def parse_load_log(text: str) -> tuple[int, int, dict[str, float]]:
    """(layers offloaded, layers in total, MiB of weights per buffer) from llama.cpp's load log."""
    offloaded = total = 0
    if match := _OFFLOADED.search(text):
        offloaded, total = int(match.group(1)), int(match.group(2))
    buffers: dict[str, float] = {}
    for name, size in _BUFFER.findall(text):
        buffers[name] = buffers.get(name, 0.0) + float(size)
    return offloaded, total, buffers


def offload_report(model_path: Path, options: Any) -> OffloadReport:
    """Load the model with these LoadOptions (-ngl, --split-mode, --tensor-split) and report
    what llama.cpp really put on the GPU."""
    from edge_llm.engines.llama_log import log_to
    from edge_llm.engines.llamacpp import LlamaCppEngine
    from edge_llm.registry import ModelSpec, ResolvedModel

    before = {d.name: d.free_mib for d in gpu_devices()}
    lines: list[str] = []

    spec = ModelSpec(name=model_path.stem, source="local", path=str(model_path))
    options = options.replace(n_ctx=options.n_ctx or 512, n_parallel=1)
    with log_to(lambda text: lines.append(text.decode("utf-8", errors="replace"))):
        engine = LlamaCppEngine(ResolvedModel(model_path.stem, model_path, spec), options)
    try:
        after = {d.name: d.free_mib for d in gpu_devices()}
        offloaded, total, buffers = parse_load_log("".join(lines))
        return OffloadReport(
            n_gpu_layers=engine.n_gpu_layers, layers_offloaded=offloaded, layers_total=total or engine.n_layer + 1,
            model_buffers_mib=buffers,
            vram_used_mib={name: max(0, before[name] - after.get(name, before[name])) for name in before},
        )
    finally:
        engine.close()
