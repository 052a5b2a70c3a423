"""ggml tensors as llama.cpp's evaluation callback sees them (`cb_eval` in llama_context_params,
called for every graph node: once with ask=True, "do you want this one?", and after computing it
with ask=False): the struct layout of the pinned ggml (ggml/include/ggml.h), op ids by name, and a
tensor's data as a numpy array, copied out of GPU memory when it lives there.

llama-cpp-python binds the callback's type but not the tensor struct; a ggml upgrade that moves
its fields is caught by `check_layout` (the struct's size, and where ggml_get_name finds the name).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

from edge_llm.engines.llama_runtime import llama_cpp
from edge_llm.errors import EdgeLLMError

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
F32 = int(GGMLQuantizationType.F32)
I32 = int(GGMLQuantizationType.I32)
_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_OP_OFFSET = GgmlTensor.op.offset
EvalCallback = Callable[[int, bool], bool]


def _lib() -> ctypes.CDLL:
    from llama_cpp._ggml import libggml

    lib = libggml
    if not getattr(lib, "_edge_llm_typed", False):
        lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
        lib.ggml_tensor_overhead.argtypes, lib.ggml_tensor_overhead.restype = [], ctypes.c_size_t
        lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_void_p
        lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        lib._edge_llm_typed = True
    return lib


def check_layout() -> None:
    """Refuse a ggml whose tensor struct is not the one this module reads."""
    if _lib().ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
        raise EdgeLLMError("this llama.cpp build's ggml_tensor layout is not the one edge-llm reads "
                           "(llama-cpp-python was upgraded?); the importance matrix cannot be collected")


def check_name_offset(address: int) -> None:
    """On a live tensor: the name is where ggml_get_name says it is."""
    if _lib().ggml_get_name(address) != address + GgmlTensor.name.offset:
        raise EdgeLLMError("this llama.cpp build's ggml_tensor layout is not the one edge-llm reads")


def op_ids(*names: str) -> dict[str, int]:
    """ggml_op values by name (MUL_MAT ...), from ggml itself rather than a copied enum."""
    lib, found = _lib(), {}
    for op in range(256):  # ops the callers ask for come long before GGML_OP_COUNT
        name = lib.ggml_op_name(op).decode()
        if name in names:
            found[name] = op
            if len(found) == len(names):
                return found
    raise EdgeLLMError(f"ggml has no op {sorted(set(names) - set(found))}")


def op_of(address: int) -> int:
    """The op of the tensor at `address`, without building the whole struct (asked per node)."""
    return ctypes.c_int.from_address(address + _OP_OFFSET).value


def tensor_at(address: int) -> GgmlTensor:
    return GgmlTensor.from_address(address)


def tensor_name(t: GgmlTensor) -> str:
    return t.name.decode(errors="replace")


def host_array(t: GgmlTensor, dtype: type[np.generic]) -> np.ndarray:
    """The tensor's elements as an array of shape (ne3, ne2, ne1, ne0) with its own strides: a view
    of host memory, or of a copy when the data is in a GPU buffer. Valid until the graph moves on."""
    shape = tuple(int(n) for n in reversed(t.ne))
    strides = tuple(int(s) for s in reversed(t.nb))
    lib = _lib()
    nbytes = lib.ggml_nbytes(ctypes.addressof(t))
    if lib.ggml_backend_buffer_is_host(t.buffer):
        raw = (ctypes.c_uint8 * nbytes).from_address(t.data)
    else:
        raw = (ctypes.c_uint8 * nbytes)()
        lib.ggml_backend_tensor_get(ctypes.addressof(t), raw, 0, nbytes)
    return np.ndarray(shape, dtype=dtype, buffer=raw, strides=strides)


def eval_callback(handler: EvalCallback) -> llama_cpp.ggml_backend_sched_eval_callback:
    """Wrap `handler(tensor_address, ask) -> bool` as llama.cpp's callback type; keep the returned
    object alive as long as the context that calls it."""
    return llama_cpp.ggml_backend_sched_eval_callback(lambda t, ask, _user: handler(t, ask))
