"""The Python API behind `edge_llm.load`, `edge_llm.generate` and `edge_llm.stream_generate`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge_llm.engines.base import Engine, collect, load_engine
from edge_llm.load_options import LoadOptions
from edge_llm.sampling import SamplingParams


def load(model: str | None = None, *, engine: str = "llama.cpp", config: str | None = None,
         **options: Any) -> Engine:
    """Load a model (registry name, .gguf path, hub reference, or None for the demo model)."""
    return load_engine(model, engine=engine, options=LoadOptions.create(options), config=config)


def stream_generate(engine: Engine, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
    """Yield the completion's text piece by piece."""
    for delta in engine.stream(prompt, SamplingParams.create(**sampling)):
        if delta.text:
            yield delta.text


def generate(engine: Engine, prompt: str | list[int], **sampling: Any) -> str:
    """The whole completion as one string."""
    params = SamplingParams.create(**sampling)
    return collect(engine.stream(prompt, params), params.n)[0].text
