"""Images in API requests: every API's image reference -> decoded images, the same way for all.

A route translating messages puts MEDIA_MARKER where each image goes (`ImageCollector.marker`,
text parts joined as llama-server joins them around images) and keeps the image's reference: a
data: URL, bare base64 (Anthropic's and Ollama's), or an http(s) URL. `load_images` then checks
the count and turns the references into images in a worker thread (never on the event loop, and
before the model's template slot is taken, so a large image never holds up another request's
template): base64 decoded with its size checked first, http(s) fetched only from hosts the
operator allowed (`--allow-image-urls`; off by default: no server-side fetches), then each image
decoded with the limits of images.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

from edge_llm.engines.media import MEDIA_MARKER
from edge_llm.errors import InvalidParameterError
from edge_llm.images import Image, ImageLimits, base64_bytes, data_url_bytes, decode_image

FETCH_TIMEOUT = 10.0  # seconds, for an allowed http(s) image URL


@dataclass(frozen=True)
class ImageRef:
    kind: str  # "url" (data: or http(s)) or "base64"
    value: str
    param: str  # the request field it came from, for errors


@dataclass
class ImageCollector:
    """A request's images in order, collected while its messages are translated."""

    refs: list[ImageRef] = field(default_factory=list)

    def marker(self, kind: str, value: object, param: str) -> str:
        if not isinstance(value, str) or not value:
            raise InvalidParameterError("an image needs its data (a data: URL or base64)", param=param)
        self.refs.append(ImageRef(kind, value, param))
        return MEDIA_MARKER


def join_parts(parts: list[str]) -> str:
    """Content parts (texts and MEDIA_MARKERs) as one text, as llama-server joins them when a
    message has media: texts on their own lines, nothing added before or after an image."""
    out = ""
    after_image = False
    for part in parts:
        if part == MEDIA_MARKER:
            out += part
            after_image = True
            continue
        if out and not after_image:
            out += "\n"
        out += part
        after_image = False
    return out


@dataclass(frozen=True)
class ImagePolicy:
    """The server's image settings (serve.py's flags)."""

    limits: ImageLimits = ImageLimits()
    url_hosts: frozenset[str] = frozenset()  # hosts whose http(s) image URLs may be fetched


async def load_images(request: Request, refs: list[ImageRef]) -> list[Image]:
    """The request's images, decoded off the event loop; a bad one is a 400 naming its field."""
    if not refs:
        return []
    policy: ImagePolicy = getattr(request.app.state.edge, "image_policy", ImagePolicy())
    if len(refs) > policy.limits.max_images:
        raise InvalidParameterError(f"{len(refs)} images in one request; the limit is {policy.limits.max_images}",
                                    param=refs[policy.limits.max_images].param)
    return await asyncio.to_thread(lambda: [decode_image(image_bytes(ref, policy), policy.limits, param=ref.param)
                                            for ref in refs])


def image_bytes(ref: ImageRef, policy: ImagePolicy) -> bytes:
    if ref.kind == "base64":
        if ref.value.startswith("data:"):
            return data_url_bytes(ref.value, policy.limits, param=ref.param)
        return base64_bytes(ref.value, policy.limits, param=ref.param)
    if ref.value.startswith("data:"):
        return data_url_bytes(ref.value, policy.limits, param=ref.param)
    parts = urlsplit(ref.value)
    if parts.scheme in ("http", "https"):
        return fetch(ref.value, policy, param=ref.param)
    raise InvalidParameterError("an image URL must be a data: URL (or http(s) from an allowed host)", param=ref.param)


def fetch(url: str, policy: ImagePolicy, *, param: str) -> bytes:
    """An http(s) image from an allowed host: no redirects, at most max_bytes, FETCH_TIMEOUT."""
    import httpx

    host = (urlsplit(url).hostname or "").lower()
    if host not in policy.url_hosts:
        raise InvalidParameterError(
            "this server does not fetch image URLs" + (f" from {host}" if policy.url_hosts else "") +
            ": send the image as a data: URL (base64), or start the server with --allow-image-urls HOST",
            param=param)
    limit = policy.limits.max_bytes
    try:
        with httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise InvalidParameterError(f"fetching the image gave HTTP {response.status_code}", param=param)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limit:
                    raise InvalidParameterError(f"the image is over {limit} bytes", param=param)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise InvalidParameterError(f"could not fetch the image: {exc}", param=param) from None
