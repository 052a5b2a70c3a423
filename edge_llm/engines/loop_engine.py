"""What the vLLM and LMDeploy engines share: an HF checkpoint folder (never GGUF, never custom
Python code), the checkpoint's own tokenizer (so usage counts and chat rendering are the same as
on every other engine), and an asyncio engine of the library's own that lives on an event loop
of its own (a `LoopThread`): the library ties its output handling to the loop it starts on, while
edge-llm's callers are the server's loop or blocking code."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from edge_llm.engines.base import Delta
from edge_llm.engines.hf_tokens import HFVocabulary, checkpoint_folder
from edge_llm.engines.threadbridge import LoopThread
from edge_llm.errors import InvalidParameterError, ModelLoadError
from edge_llm.load_options import LoadOptions
from edge_llm.registry import ResolvedModel
from edge_llm.sampling import SamplingParams


def gpu_kv_cache(options: LoadOptions, library: str, kv_types: dict[str, Any], *, splits_by: str) -> Any:
    """The KV cache type (-ctk, -ctv) in the library's terms; the llama.cpp-only options refused:
    these libraries put the whole model on the GPU(s) and split it by --tp (and --pp)."""
    if options.cache_type_k != options.cache_type_v:
        raise InvalidParameterError(f"{library} uses one KV cache type for K and V: give -ctk and -ctv the same "
                                    "value", param="cache_type_v")
    kv = kv_types.get(options.cache_type_k.lower())
    if kv is None:
        raise InvalidParameterError(f"{library}'s KV cache takes {', '.join(kv_types)}; "
                                    f"got {options.cache_type_k!r}", param="cache_type_k")
    if options.n_gpu_layers not in (None, 0, -1):
        raise InvalidParameterError(f"{library} puts the whole model on the GPU(s): -ngl takes no layer count here "
                                    "(use --tp to spread it over GPUs)", param="n_gpu_layers")
    if options.tensor_split is not None or options.split_mode != "layer":
        raise InvalidParameterError(f"--split-mode/--tensor-split are llama.cpp options; {library} splits by "
                                    f"{splits_by}", param="split_mode")
    return kv


class LoopEngine(HFVocabulary):
    library: ClassVar[str]  # the library's name, for messages
    n_gpu_layers = -1  # the whole model on the GPU(s)
    _engine: Any = None  # the library's engine, on self._loop
    _loop: LoopThread | None = None

    def _open(self, model: ResolvedModel, options: LoadOptions) -> Path:
        """Check the checkpoint before the library sees it; the path to load."""
        path = checkpoint_folder(model, self.library, "(pull the original repo, or a GPTQ/AWQ one)")
        self.model_name = model.name
        self.path = path
        self.options = options
        return path

    def _start(self, start: Callable[[], Awaitable[Any]]) -> None:
        """Create the library's engine on a loop of its own; a failure is one ModelLoadError line."""
        self._loop = LoopThread(f"edge-llm-{self.name}")
        try:
            self._engine = self._loop.run(start())
        except Exception as exc:
            self._loop.close()
            text = str(exc).strip()
            raise ModelLoadError(f"{self.library} could not load {self.path}: "
                                 f"{text.splitlines()[0] if text else type(exc).__name__}") from None

    @abstractmethod
    def _deltas(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """The request's deltas; runs on the engine's loop."""

    @abstractmethod
    def _shut_down(self, engine: Any) -> None: ...

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        return self._loop.stream(lambda: self._deltas(tokens, params))

    async def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        async for delta in self._loop.stream_async(lambda: self._deltas(tokens, params)):
            yield delta

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            self._shut_down(engine)
        if self._loop is not None:
            self._loop.close()
            self._loop = None
