"""llama.cpp's log through llama-cpp-python's callback, with ggml's log levels read right.

llama-cpp-python 0.3.36 maps ggml's levels by an older enum (1 INFO, 2 WARN, 3 ERROR, 4 DEBUG),
while the ggml it ships numbers them 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR: every llama.cpp warning
was taken for an error and printed in quiet mode (the first embedding request's "model default
pooling_type is [-1], but [1] was specified"), and real errors were taken for debug output.
The table is corrected once, here, so every install of that callback filters as intended; quiet
mode shows nothing (our own errors say to run with -v for llama.cpp's log), -v everything.

`log_to` sends the log to a function of ours for a while (quantize's progress, offload's report of
where the layers went), then back to that callback: the one module that touches llama-cpp-python's
private `_logger`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import llama_cpp
from llama_cpp import _logger

_logger.GGML_LOG_LEVEL_TO_LOGGING_LEVEL.update({
    0: logging.CRITICAL,  # NONE
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
    5: logging.DEBUG,  # CONT: a continuation line, shown only when verbose
})


def set_verbose(verbose: bool) -> None:
    _logger.logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)


def route_mtmd_log() -> None:
    """libmtmd (the vision projector) logs through its own callback, to stderr unless told: send it
    where llama.cpp's log goes (quiet unless -v)."""
    from llama_cpp import mtmd_cpp

    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# llama.cpp has one log callback per process: one `log_to` at a time.
_redirect = threading.Lock()


@contextmanager
def log_to(handle: Callable[[bytes], None]) -> Iterator[None]:
    """Inside the block, each piece of llama.cpp's log goes to `handle` (raw bytes), not to the
    logging module; afterwards the usual callback is back."""

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        handle(text or b"")

    with _redirect:
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))  # `callback` lives until the block ends
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
