"""Images from users, decoded as hostile input: bytes (a data: URL, base64, a file) -> RGB pixels.

Every image is checked before its pixels are decoded: its size in bytes, then (from the header
alone) its dimensions and pixel count, so a decompression bomb (a small PNG that expands to
gigabytes) is refused before any memory is taken. Decoding is Pillow's (libjpeg-turbo, libpng,
libwebp: well kept and fuzzed), limited to the formats llama.cpp's own stb_image path reads plus
WebP, and runs in the caller's worker thread, never on the event loop or the engine thread; at
most DECODE_SLOTS images decode at once in the process, so many image requests cannot take the
memory of many full-size images together.

What the model sees is what llama-server's stb_image gives for the same file: RGB, alpha dropped
(not composited), palette expanded, 16-bit samples cut to their high byte, the first frame of an
animation, EXIF orientation not applied. Lossless formats therefore give the same pixels; JPEG may
differ in the last bit or two (libjpeg-turbo's IDCT and chroma upsampling against stb_image's).
CMYK JPEGs, which stb_image refuses, are converted to RGB.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from dataclasses import dataclass

from edge_llm.errors import InvalidParameterError

# The formats accepted (Pillow's names): stb_image's common ones, and WebP.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
DECODE_SLOTS = 2
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may be; the server's flags set them (serve.py)."""

    max_bytes: int = 10 * 2**20  # the encoded file (llama-server's cap on a fetched image)
    max_pixels: int = 25_000_000  # width x height, checked from the header before decoding
    max_side: int = 16384  # either dimension
    max_images: int = 8  # per request


@dataclass(frozen=True, eq=False)
class Image:
    """Decoded pixels, RGBRGB..., row-major; `digest` names the content (sha256 of the size and
    the pixels): the same picture sent again, in any file format, has the same digest."""

    width: int
    height: int
    rgb: bytes
    digest: str


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), *, param: str = "image") -> Image:
    """Check and decode one image file's bytes; an InvalidParameterError names what is wrong."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if not data:
        raise InvalidParameterError("the image is empty", param=param)
    if len(data) > limits.max_bytes:
        raise InvalidParameterError(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}", param=param)
    with _decoding:
        try:
            img = PILImage.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise InvalidParameterError(f"not an image edge-llm reads ({', '.join(FORMATS)})", param=param) \
                from None
        except PILImage.DecompressionBombError as exc:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
            raise InvalidParameterError(f"the image is too large: {exc}", param=param) from None
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's header parsers raise these
            raise InvalidParameterError(f"the image header is corrupt: {exc}", param=param) from None
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidParameterError(f"the image has no pixels ({width}x{height})", param=param)
        if max(width, height) > limits.max_side or width * height > limits.max_pixels:
            raise InvalidParameterError(
                f"the image is {width}x{height}; the limit is {limits.max_pixels} pixels and "
                f"{limits.max_side} pixels a side", param=param)
        try:
            img.seek(0)  # an animation: its first frame, as stb_image reads a GIF
            img.load()
            pixels = _rgb(img, np)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidParameterError(f"the image is truncated or corrupt: {exc}", param=param) from None
        except PILImage.DecompressionBombError as exc:
            raise InvalidParameterError(f"the image is too large: {exc}", param=param) from None
        finally:
            img.close()
    rgb = pixels.tobytes()
    digest = hashlib.sha256(f"{width}x{height}:".encode() + rgb).hexdigest()
    return Image(width, height, rgb, digest)


def _rgb(img, np):
    """The image as an (h, w, 3) uint8 array, the way stb_image reads it."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: the high byte of each sample (stb_image's 16 -> 8 bit rule).
        grey = (np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(img, dtype=np.float32).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGBA", "RGBX", "RGBa"):
        return np.ascontiguousarray(np.asarray(img)[:, :, :3])  # alpha dropped, not composited
    if mode in ("LA", "La", "PA"):
        img = img.convert("L") if mode != "PA" else img.convert("RGB")
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def base64_bytes(text: str, limits: ImageLimits, *, param: str) -> bytes:
    """Base64 text (with or without line breaks) -> bytes, its size checked before decoding."""
    if len(text) > limits.max_bytes * 4 // 3 + 4096:
        raise InvalidParameterError(f"the image is over {limits.max_bytes} bytes", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError("the image is not valid base64", param=param) from None


def image_file_bytes(ref: str, limits: ImageLimits = ImageLimits(), *, param: str = "image") -> bytes:
    """A local image: a data: URL, or a file path (the CLI's own files: `chat --image`, batch records)."""
    if ref.startswith("data:"):
        return data_url_bytes(ref, limits, param=param)
    from pathlib import Path

    from edge_llm.files import os_errors

    path = Path(ref.removeprefix("file://")).expanduser()
    with os_errors(path, "read"):
        if path.stat().st_size > limits.max_bytes:
            raise InvalidParameterError(f"{path} is over {limits.max_bytes} bytes", param=param)
        return path.read_bytes()


def data_url_bytes(url: str, limits: ImageLimits, *, param: str) -> bytes:
    """`data:image/png;base64,....` -> bytes (llama-server's rule: an image/ media type, base64)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise InvalidParameterError("a data URL must be data:image/...;base64,...", param=param)
    if not head.startswith("data:image/"):
        raise InvalidParameterError(f"not an image data URL ({head[:40]!r})", param=param)
    if not head.endswith(";base64"):
        raise InvalidParameterError("an image data URL must be base64 encoded", param=param)
    return base64_bytes(payload, limits, param=param)
