"""The vision projector (`--mmproj`): llama.cpp's libmtmd through llama-cpp-python's `mtmd_cpp`.

Three jobs, each on the thread llama.cpp allows:
  - `tokenize` (any thread; mtmd_tokenize is thread-safe): a MediaPrompt -> MediaTokens. The text
    between images is tokenized by the engine, as any prompt; each image goes through mtmd, which
    resizes and slices it as the model expects and wraps it in the model's own image markers
    (Gemma 3's <start_of_image>, Qwen2-VL's <|vision_start|>, SmolVLM's tile tokens ...): the same
    chunks llama-server's mtmd_tokenize makes for one marker in its prompt text;
  - `encode` (the vision worker's thread only: an mtmd context is not thread-safe): one image
    chunk through the vision tower, its embeddings copied out;
  - the embeddings' positions and attention (the engine thread decodes them into a slot, see
    llama_runtime.decode_embeddings): M-RoPE grid positions and non-causal attention as
    mtmd_helper_decode_image_chunk sets them.

`VisionWorker` is the thread that encodes: the scheduler hands it the images of admitted requests
in order and goes on decoding the other slots meanwhile.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_llm.engines import llama_runtime as rt
from edge_llm.engines.llama_log import route_mtmd_log
from edge_llm.engines.media import MEDIA_MARKER, ImageSpan, MediaPrompt, MediaTokens, placeholder_ids
from edge_llm.engines.work_thread import WorkThread
from edge_llm.errors import EdgeLLMError, InvalidParameterError, ModelLoadError

log = logging.getLogger(__name__)


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


def find_projector(model_path: Path) -> Path | None:
    """The projector beside a GGUF, when there is exactly one (hub repos name it mmproj-*.gguf)."""
    folder = model_path.parent
    try:
        found = [p for p in folder.iterdir()
                 if p.is_file() and p.suffix.lower() == ".gguf" and "mmproj" in p.name.lower() and p != model_path]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def projector_path(option: str | None, model_path: Path) -> Path | None:
    """The projector to load: the --mmproj file (a path, or a name beside the weights), else the
    one found beside the weights; "none" turns the search off."""
    if option is None:
        return find_projector(model_path)
    if option.lower() == "none":
        return None
    given = Path(option).expanduser()
    for candidate in (given, model_path.parent / option):
        if candidate.is_file():
            return candidate.resolve()
    raise ModelLoadError(f"projector file not found: {option} (--mmproj)")


class ImageChunk:
    """One image chunk (mtmd_input_chunk, owned): what the vision tower encodes."""

    def __init__(self, projector: Projector, handle: int) -> None:
        m = _mtmd()
        self._projector = projector
        self._handle = handle
        self.n_tokens = int(m.mtmd_input_chunk_get_n_tokens(handle))
        self.n_pos = int(m.mtmd_input_chunk_get_n_pos(handle))
        self.non_causal = bool(m.mtmd_decode_use_non_causal(projector.ctx, handle))

    def positions(self, pos0: int) -> np.ndarray:
        """Positions of the embedding rows placed at `pos0`: shape (4, n) section-major for M-RoPE
        (t, y, x, z as mtmd's helper lays them out), (1, n) otherwise."""
        if not self._projector.mrope:
            return np.arange(pos0, pos0 + self.n_tokens, dtype=np.int32)[None, :]
        m = _mtmd()
        image = m.mtmd_input_chunk_get_tokens_image(self._handle)
        out = (m.mtmd_decoder_pos * self.n_tokens)()
        m.mtmd_helper_image_get_decoder_pos(image, pos0, out)
        raw = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_uint32)), shape=(self.n_tokens, 4))
        t, x, y, z = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        return np.stack([t, y, x, z]).astype(np.int32)

    def encode(self) -> np.ndarray:
        """The chunk through the vision tower: (n_tokens, n_embd) float32. Vision worker only."""
        m = _mtmd()
        if self._handle is None:
            raise EdgeLLMError("the image was released before it was encoded")
        status = m.mtmd_encode_chunk(self._projector.ctx, self._handle)
        if status != 0:
            raise EdgeLLMError(f"the vision encoder failed on an image (mtmd_encode_chunk returned {status})")
        ptr = m.mtmd_get_output_embd(self._projector.ctx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_tokens, self._projector.n_embd)).copy()

    def close(self) -> None:
        if self._handle is not None:
            _mtmd().mtmd_input_chunk_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


class Projector:
    """An mtmd context on the engine's weights and a projector GGUF."""

    def __init__(self, path: Path, model: rt.LlamaModel, *, n_threads: int, use_gpu: bool, verbose: bool) -> None:
        m = _mtmd()
        rt.check_gguf_file(path)
        route_mtmd_log()
        self.path = path
        params = m.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = verbose
        params.warmup = True  # the first image should not pay for the graph's allocation
        self._marker = MEDIA_MARKER.encode()
        params.media_marker = self._marker
        self.ctx = m.mtmd_init_from_file(str(path).encode(), model.model, params)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not load the projector {path}: not a projector for this model, "
                                 "or corrupt (run with -v for llama.cpp's log)")
        if not m.mtmd_support_vision(self.ctx):
            self.close()
            raise ModelLoadError(f"{path} is an audio projector; edge-llm reads images only")
        self.mrope = bool(m.mtmd_decode_use_mrope(self.ctx))
        self.n_embd = int(rt.llama_cpp.llama_model_n_embd_inp(model.model))
        self._lock = threading.Lock()  # close() against tokenize in a worker thread

    def tokenize(self, prompt: MediaPrompt, tokenize_range: Callable[[int, int], list[int]]) -> MediaTokens:
        """Prompt text and images -> token ids with placeholders and image spans.
        `tokenize_range(start, end)`: the engine's tokens for prompt.text[start:end] (start 0: the
        prompt's beginning, where a beginning-of-sequence token may go)."""
        pieces = prompt.text.split(MEDIA_MARKER)
        if len(pieces) - 1 != len(prompt.images):
            raise InvalidParameterError(
                f"{len(prompt.images)} images but {len(pieces) - 1} places for them in the rendered prompt "
                "(the chat template dropped or repeated a message with an image)", param="messages")
        tokens: list[int] = []
        spans: list[ImageSpan] = []
        try:
            start = 0
            for i, piece in enumerate(pieces):
                if i > 0:
                    self._add_image(prompt.images[i - 1], tokens, spans)
                    start += len(MEDIA_MARKER)
                tokens += tokenize_range(start, start + len(piece))
                start += len(piece)
        except BaseException:
            for span in spans:
                span.chunk.close()
            raise
        if spans and spans[-1].end == len(tokens):
            for span in spans:
                span.chunk.close()
            raise InvalidParameterError("the prompt ends with an image; add text after it", param="messages")
        return MediaTokens(tokens, spans)

    def _add_image(self, image, tokens: list[int], spans: list[ImageSpan]) -> None:
        """One image's chunks appended: its marker tokens as ids, each image chunk as placeholders."""
        m = _mtmd()
        data = (ctypes.c_ubyte * len(image.rgb)).from_buffer_copy(image.rgb)
        with self._lock:
            if not self.ctx:
                raise EdgeLLMError("the model was unloaded")
            bitmap = m.mtmd_bitmap_init(image.width, image.height, data)
            chunks = m.mtmd_input_chunks_init()
            try:
                part = m.mtmd_input_part(text=None, bitmap=bitmap)
                parts = (ctypes.POINTER(m.mtmd_input_part) * 1)(ctypes.pointer(part))
                status = m.mtmd_tokenize_from_parts(self.ctx, chunks, parts, 1, False)
                if status != 0:
                    raise InvalidParameterError(f"the model's image preprocessor refused a {image.width}x"
                                                f"{image.height} image (mtmd_tokenize returned {status})",
                                                param="image")
                k = 0
                for i in range(m.mtmd_input_chunks_size(chunks)):
                    chunk = m.mtmd_input_chunks_get(chunks, i)
                    if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        n = ctypes.c_size_t()
                        ids = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                        tokens += [int(ids[j]) for j in range(n.value)]
                        continue
                    owned = ImageChunk(self, m.mtmd_input_chunk_copy(chunk))
                    digest = hashlib.sha256(f"{image.digest}:{k}".encode()).hexdigest()
                    k += 1
                    spans.append(ImageSpan(len(tokens), owned.n_tokens, owned.n_pos, digest, chunk=owned))
                    tokens += placeholder_ids(digest, owned.n_tokens)
            finally:
                m.mtmd_input_chunks_free(chunks)
                m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            if getattr(self, "ctx", None):
                _mtmd().mtmd_free(self.ctx)
                self.ctx = None


class VisionWorker:
    """Encodes the queued image chunks in order on a thread of its own, while the engine thread
    decodes the other slots; the thread ends when nothing is queued (engines/work_thread.py says
    why). `on_done()` is called from that thread after each chunk, so the scheduler can wake up."""

    def __init__(self, on_done: Callable[[], None]) -> None:
        self._queue: deque[tuple[ImageSpan, Callable[[], bool]]] = deque()
        self._lock = threading.Lock()
        self._on_done = on_done
        self._worker = WorkThread("edge-llm-vision", self._run)
        self._closed = False
        self.busy = False  # encoding now (the engine thread reads it to share the cores)

    def submit(self, span: ImageSpan, cancelled: Callable[[], bool]) -> None:
        span.queued = True
        with self._lock:
            self._queue.append((span, cancelled))
            if not self._closed:
                self._worker.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (it is not between images)."""
        return self._worker.alive

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._worker.ended()
                    return
                span, cancelled = self._queue.popleft()
                self.busy = True
            try:
                _encode(span, cancelled)
            finally:
                self.busy = False
            self._on_done()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._worker.join(timeout=60)


def _encode(span: ImageSpan, cancelled: Callable[[], bool]) -> None:
    """One image chunk through the vision tower; its embeddings (or its error) left on the span."""
    chunk = None if cancelled() else span.begin_encoding()
    if chunk is None:
        return
    embeddings, error = None, None
    try:
        embeddings = chunk.encode()
    except BaseException as exc:  # noqa: BLE001 - reported to the request
        log.warning("vision encoder: %s", exc)
        error = exc if isinstance(exc, EdgeLLMError) else EdgeLLMError(f"the vision encoder failed: {exc}")
    finally:
        span.end_encoding(embeddings, error)
