"""edge-llm: from a hub checkpoint to a fast local LLM service.

Python API (the CLI is built on it):

    import edge_llm
    engine = edge_llm.load()                      # the bundled demo model, or a name / path / hf: ref
    print(edge_llm.generate(engine, "The capital of France is", max_tokens=16, temperature=0))
    for piece in edge_llm.stream_generate(engine, "Once upon a time", max_tokens=32):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_llm.errors import EdgeLLMError
from edge_llm.sampling import SamplingParams

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edge_llm.engines.base import Engine

__all__ = ["EdgeLLMError", "SamplingParams", "generate", "load", "stream_generate"]


# The engine pulls in llama.cpp; import it only when a model is loaded.
def load(model: str | None = None, **options: Any) -> Engine:
    from edge_llm.api import load as _load

    return _load(model, **options)


def generate(engine: Engine, prompt: str | list[int], **sampling: Any) -> str:
    from edge_llm.api import generate as _generate

    return _generate(engine, prompt, **sampling)


def stream_generate(engine: Engine, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
    from edge_llm.api import stream_generate as _stream

    return _stream(engine, prompt, **sampling)
