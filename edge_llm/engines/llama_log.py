"""llama.cpp's log through llama-cpp-python's callback, with ggml's log levels read right.

llama-cpp-python 0.3.36 maps ggml's levels by an older enum (1 INFO, 2 WARN, 3 ERROR, 4 DEBUG),
while the ggml it ships numbers them 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR: every llama.cpp warning
was taken for an error and printed in quiet mode (the first embedding request's "model default
pooling_type is [-1], but [1] was specified"), and real errors were taken for debug output.
The table is corrected once, here, so every install of that callback (the engine's, quantize's,
offload's restore) filters as intended; quiet mode shows nothing (our own errors say to run with
-v for llama.cpp's log), -v everything.
"""

from __future__ import annotations

import logging

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
