"""A prompt with images, as the scheduler sees it: plain Python, no llama.cpp calls.

A chat request with images becomes a `MediaPrompt`: the rendered template text, with MEDIA_MARKER
where each image goes, and the decoded images in order. The engine turns it into `MediaTokens`:
the prompt's token ids, where each image's embeddings take `n_tokens` placeholder ids, and one
`ImageSpan` per image (where it starts, how many KV cells and positions it takes, and the mtmd
chunk that the vision encoder turns into embeddings).

Placeholder ids are negative (no real token has one) and derived from the image's content digest
and the position inside the image, so everything keyed by token ids keys images by their content:
a slot or a saved prompt-cache state whose tokens match a prompt through an image holds that very
image (a different image differs from its first placeholder on). A match is only ever used up to
an image's start or end, never into the middle of one (`whole_images`): an image's embeddings are
evaluated whole. Ids carry 31 bits each and an image has many, so matching a whole image by
accident or by crafting means matching its sha256.

Positions: a model with M-RoPE (Qwen2-VL) gives an image fewer positions (`n_pos`, its grid's
larger side) than KV cells (`n_tokens`); text after it continues from the image's first position
plus n_pos, as llama.cpp's mtmd helpers do. `kv_position` maps a token index to that position.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Where an image goes in rendered prompt text: random per process (as llama-server's), so no
# user text can name an image slot.
MEDIA_MARKER = f"<__media_{secrets.token_hex(8)}__>"


@dataclass(eq=False)
class ImageSpan:
    """One image's run of placeholders in a prompt."""

    start: int  # index of its first placeholder in the prompt's tokens
    n_tokens: int  # KV cells (embedding rows)
    n_pos: int  # positions it advances (n_tokens, or fewer with M-RoPE)
    digest: str
    chunk: Any = None  # the projector's handle on the image (projector.ImageChunk)
    embeddings: Any = None  # (n_tokens, n_embd) float32, once encoded
    error: BaseException | None = None  # the encode failed
    queued: bool = False  # handed to the vision worker
    # The chunk is freed by whoever finishes last: the request (released) or the vision worker
    # (encoding), never while the encoder reads it.
    encoding: bool = False
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def end(self) -> int:
        return self.start + self.n_tokens

    def begin_encoding(self) -> Any:
        """The chunk to encode, or None if the request let it go (vision worker)."""
        with self.lock:
            if self.released or self.chunk is None:
                return None
            self.encoding = True
            return self.chunk

    def end_encoding(self, embeddings: Any, error: BaseException | None) -> None:
        with self.lock:
            self.encoding = False
            if self.released:
                self._free()
            else:
                self.embeddings, self.error = embeddings, error

    def release(self) -> None:
        """Its pixels and embeddings are no longer needed (decoded into the slot, or the request
        is over)."""
        with self.lock:
            self.released = True
            if not self.encoding:
                self._free()

    def _free(self) -> None:
        if self.chunk is not None:
            self.chunk.close()
            self.chunk = None
        self.embeddings = None


class MediaTokens(list):
    """A prompt's token ids with placeholders for its images (a list of ints, so the scheduler's
    token bookkeeping is unchanged) and the images' spans, in order."""

    def __init__(self, tokens: Sequence[int], images: Sequence[ImageSpan]) -> None:
        super().__init__(tokens)
        self.images: tuple[ImageSpan, ...] = tuple(images)

    def release(self) -> None:
        """Free the images' pixels and embeddings (the request is over)."""
        for span in self.images:
            span.release()

    def release_span(self, span: ImageSpan) -> None:
        span.release()


@dataclass
class MediaPrompt:
    """A rendered prompt with MEDIA_MARKER where each image goes, and the images (images.Image).
    `prompt`: a chat (chat_tokens.ChatPrompt: its content stays text when tokenized) or raw text."""

    prompt: Any
    images: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt.text


def placeholder_ids(digest: str, n: int) -> list[int]:
    """The ids standing for an image's n embedding rows: negative, from its digest."""
    seed = bytes.fromhex(digest) if len(digest) == 64 else hashlib.sha256(digest.encode()).digest()
    out = []
    for i in range(n):
        word = int.from_bytes(hashlib.sha256(seed + i.to_bytes(4, "little")).digest()[:4], "little")
        out.append(-1 - (word & 0x7FFFFFFE))
    return out


def images_of(tokens: Sequence[int]) -> tuple[ImageSpan, ...]:
    return getattr(tokens, "images", ())


def whole_images(prefix: int, images: Sequence[ImageSpan]) -> int:
    """`prefix` moved back to the start of an image it ends inside of."""
    for span in images:
        if span.start < prefix < span.end:
            return span.start
    return prefix


def kv_position(index: int, images: Sequence[ImageSpan]) -> int:
    """The position of the token at `index` (or of the next one, at the end): the index, less
    what the images before it take in cells beyond their positions (M-RoPE)."""
    shift = 0
    for span in images:
        if span.end <= index:
            shift += span.n_tokens - span.n_pos
        elif span.start < index and span.n_pos != span.n_tokens:
            return span.start - shift  # inside an M-RoPE image: its cells all sit at its first position
    return index - shift


def next_image(index: int, images: Sequence[ImageSpan]) -> ImageSpan | None:
    """The first image ending after `index`."""
    for span in images:
        if span.end > index:
            return span
    return None


def has_placeholders(tokens: Sequence[int]) -> bool:
    return any(t < 0 for t in tokens)
