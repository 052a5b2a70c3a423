"""Images as hostile input (edge_llm/images.py), the plain-Python side of prompts with images
(engines/media.py: placeholders, whole images, M-RoPE positions), and the server's image handling
in every API on a FakeEngine (no projector: a clear 400 in each API's shape; bad images and
refused URLs: 400s naming the field). No model: seconds."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import anthropic
import numpy as np
import ollama
import openai
import pytest
from fake_engine import FakeEngine
from live_server import live_server
from PIL import Image as PILImage

from edge_llm.engines.media import (
    MEDIA_MARKER,
    ImageSpan,
    kv_position,
    next_image,
    placeholder_ids,
    whole_images,
)
from edge_llm.errors import InvalidParameterError
from edge_llm.images import ImageLimits, data_url_bytes, decode_image
from edge_llm.server.media import ImagePolicy, join_parts


def encoded(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, fmt, **save)
    return out.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_png_pixels_and_digest_are_the_content():
    image = decode_image(encoded(RGB))
    assert (image.width, image.height) == (30, 20)
    assert np.array_equal(np.frombuffer(image.rgb, np.uint8).reshape(20, 30, 3), RGB)
    # the same pixels in another lossless file format: the same digest (the prompt cache's key)
    assert decode_image(encoded(RGB, "BMP")).digest == image.digest
    assert decode_image(encoded(RGB[::-1].copy())).digest != image.digest


def test_modes_read_as_stb_image_reads_them():
    rgba = np.dstack([RGB, np.full((20, 30), 7, np.uint8)])
    assert decode_image(encoded(rgba)).rgb == RGB.tobytes()  # alpha dropped, not composited
    grey16 = RNG.integers(0, 65536, (8, 9), dtype=np.uint16)
    out = io.BytesIO()
    PILImage.fromarray(grey16).save(out, "PNG")
    got = np.frombuffer(decode_image(out.getvalue()).rgb, np.uint8).reshape(8, 9, 3)
    assert np.array_equal(got[:, :, 0], (grey16 >> 8).astype(np.uint8)) and np.array_equal(got[:, :, 0], got[:, :, 2])
    cmyk = io.BytesIO()
    PILImage.fromarray(RGB).convert("CMYK").save(cmyk, "JPEG", quality=95)
    assert decode_image(cmyk.getvalue()).width == 30  # stb_image refuses CMYK; we convert it
    frames = [PILImage.fromarray(np.full((10, 10, 3), v, np.uint8)) for v in (10, 200)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    first = np.frombuffer(decode_image(gif.getvalue()).rgb, np.uint8)
    assert abs(int(first[0]) - 10) < 8  # the first frame of an animation
    palette = PILImage.fromarray(RGB).convert("P")
    out = io.BytesIO()
    palette.save(out, "PNG", transparency=0)
    assert len(decode_image(out.getvalue()).rgb) == 20 * 30 * 3


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds one compressed row: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1))) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"GIF89a not really", "corrupt|not an image"),
    (b"%PDF-1.4 hello", "not an image"),
    (b"\x00" * 100, "not an image"),
    (_png_header_only(100_000, 100_000), "too large|pixels"),  # 10^10 pixels: refused from the header
    (_png_header_only(5_000, 5_000), "5000x5000"),
    (_png_header_only(20_000, 2), "a side"),
    (encoded(RGB)[:-40], "truncated|corrupt"),
    (encoded(RGB, "JPEG")[:200], "truncated|corrupt"),
])
def test_hostile_images_are_one_clear_error(data, message):
    with pytest.raises(InvalidParameterError, match=message) as err:
        decode_image(data, ImageLimits(max_pixels=4_000_000, max_side=16384), param="messages.0.content.1")
    assert err.value.param == "messages.0.content.1"


def test_size_limit_before_decoding():
    with pytest.raises(InvalidParameterError, match="limit is 100"):
        decode_image(encoded(RGB), ImageLimits(max_bytes=100))
    with pytest.raises(InvalidParameterError, match="over"):
        data_url_bytes("data:image/png;base64," + "A" * 10_000, ImageLimits(max_bytes=1000), param="x")
    with pytest.raises(InvalidParameterError, match="base64"):
        data_url_bytes("data:image/png;base64,!!!!", ImageLimits(), param="x")
    with pytest.raises(InvalidParameterError, match="image data URL"):
        data_url_bytes("data:text/plain;base64,AAAA", ImageLimits(), param="x")


def test_placeholders_whole_images_and_mrope_positions():
    a, b = placeholder_ids("ab" * 32, 5), placeholder_ids("cd" * 32, 5)
    assert all(t < 0 for t in a + b) and a != b and a == placeholder_ids("ab" * 32, 5)
    assert len(set(a)) == 5
    # text 0-3, an M-RoPE image at 4..15 (12 cells, 4 positions), text 16-19
    spans = (ImageSpan(4, 12, 4, "x"),)
    assert [kv_position(i, spans) for i in (0, 3, 4, 16, 17, 20)] == [0, 3, 4, 8, 9, 12]
    assert kv_position(10, spans) == 4  # inside: every cell of the image sits at its first position
    assert [whole_images(n, spans) for n in (3, 4, 5, 15, 16, 18)] == [3, 4, 4, 4, 16, 18]
    assert next_image(0, spans) is spans[0] and next_image(16, spans) is None
    plain = (ImageSpan(4, 12, 12, "x"),)  # not M-RoPE: positions are the indexes
    assert [kv_position(i, plain) for i in (10, 16, 20)] == [10, 16, 20]


def test_parts_joined_as_llama_server_joins_them():
    m = MEDIA_MARKER
    assert join_parts(["a", "b"]) == "a\nb"
    assert join_parts([m, "Describe.", "Briefly."]) == m + "Describe.\nBriefly."
    assert join_parts(["Look:", m, "and", m]) == "Look:" + m + "and" + m


# -- the server, on a model without a projector -------------------------------------------------------------


@pytest.fixture(scope="module")
def url():
    from edge_llm.server import ModelManager, create_app

    engine = FakeEngine("Hello there.", n_ctx=1024, n_parallel=2, model_name="demo")
    manager = ModelManager({"demo": "demo"}, loader=lambda ref: engine, keep_alive=-1)
    policy = ImagePolicy(ImageLimits(max_images=2))
    with live_server(create_app(manager, max_body_bytes=1 << 20, image_policy=policy)) as url:
        yield url


PNG = encoded(RGB)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def openai_image(oa, url: str, n: int = 1):
    parts = [{"type": "image_url", "image_url": {"url": url}}] * n + [{"type": "text", "text": "What is it?"}]
    return oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}], max_tokens=4)


def test_no_projector_is_a_400_in_each_api(oa, claude, llama, url):
    with pytest.raises(openai.BadRequestError, match="does not take images") as err:
        openai_image(oa, DATA_URL)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="does not take images"):
        oa.responses.create(model="demo", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": DATA_URL}, {"type": "input_text", "text": "What is it?"}]}])
    with pytest.raises(anthropic.BadRequestError, match="does not take images") as aerr:
        claude.messages.create(model="demo", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(PNG).decode()}},
            {"type": "text", "text": "What is it?"}]}])
    assert aerr.value.body["type"] == "error"  # Anthropic's error shape
    with pytest.raises(ollama.ResponseError, match="does not take images") as oerr:
        llama.chat(model="demo", messages=[{"role": "user", "content": "What is it?", "images": [PNG]}])
    assert oerr.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="does not take images"):
        llama.generate(model="demo", prompt="What is it?", images=[PNG])
    # text still works, and the model says it takes no images
    assert openai_image.__name__ and oa.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4).choices[0].message.content
    assert [m.model_extra.get("capabilities") for m in oa.models.list().data] == [["completion"]]


def test_bad_images_are_400s_naming_the_field(oa, url):
    with pytest.raises(openai.BadRequestError, match="not an image") as err:
        openai_image(oa, "data:image/png;base64," + base64.b64encode(b"hello, world").decode())
    assert err.value.body["param"] == "messages.0.content.0.image_url"
    with pytest.raises(openai.BadRequestError, match="does not fetch image URLs"):
        openai_image(oa, "http://127.0.0.1:9/cat.png")  # no server-side fetch without --allow-image-urls
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        openai_image(oa, "file:///etc/passwd")
    with pytest.raises(openai.BadRequestError, match="3 images in one request; the limit is 2"):
        openai_image(oa, DATA_URL, n=3)
    with pytest.raises(openai.BadRequestError, match="6000x6000"):
        openai_image(oa, "data:image/png;base64," + base64.b64encode(_png_header_only(6_000, 6_000)).decode())
