"""Images through the llama.cpp engine: tiny random-weight vision checkpoints of each family
(tests/tiny_vision_models.py), converted by llama.cpp's own converter (text GGUF and `--mmproj`
projector), then

- greedy output with images equal to llama.cpp's own multimodal path, mtmd_helper_eval_chunks (what
  llama-mtmd-cli and llama-server's helpers run), in-process through llama-cpp-python: one request,
  several images, M-RoPE (Qwen2-VL), non-causal image attention (Gemma 3), tiled images (SmolVLM);
- the scheduler's guarantees with images: a returning conversation with the same image is not
  encoded again (the prompt cache keys images by content), text streams keep streaming while an
  image is encoded (the vision tower made slow here), cancelling while encoding frees the slot and
  the image, speculation leaves the output unchanged with images in the history;
- over HTTP with the official openai client against llama-server (`--mmproj`, the pinned sdist's
  build: tests/llama_cpp_tools.py builds it once per machine).
"""

from __future__ import annotations

import base64
import ctypes
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from llama_cpp_reference import _RUNNER, _checkpoint_hash, cache_dir, llama_cpp_dir, reference_gguf
from llama_cpp_tools import BUILD_TIMEOUT_S
from PIL import Image as PILImage
from test_webui import browser as browser  # noqa: F401 (the Chromium fixture)

from edge_llm.engines.media import MEDIA_MARKER, MediaPrompt
from edge_llm.images import decode_image
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.slow

# LLaVA-1.5: llama.cpp's converter refuses its projector ("Unsupported model type: clip_vision_model"; the
# hub's LLaVA mmproj files come from its legacy scripts), so there is no llama.cpp-made reference here.
FAMILIES = ["gemma3", "smolvlm", "qwen2-vl", "qwen2.5-vl", "internvl"]
N_PREDICT = 12


def png(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def mmproj_gguf(hf_dir: Path, pre: str) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py --mmproj` output for a checkpoint (cached like reference_gguf)."""
    import hashlib

    key = hashlib.sha256(f"mmproj|{_checkpoint_hash(hf_dir)}".encode()).hexdigest()[:32]
    out = cache_dir() / "reference-gguf" / f"mmproj-{key}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    vendored = llama_cpp_dir()
    tmp = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendored / "gguf-py"), str(vendored)]),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _RUNNER, str(vendored / "convert_hf_to_gguf.py"), pre, "",
                             str(hf_dir), "--mmproj", "--outfile", str(tmp), "--outtype", "f16"],
                            capture_output=True, text=True, env=env, cwd=vendored)
    if result.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's converter failed on {hf_dir.name} --mmproj:\n{result.stderr[-3000:]}")
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def vision_tokenizers(tmp_path_factory, demo_path):
    from tiny_models import build_tokenizers

    return build_tokenizers(tmp_path_factory.mktemp("vision-tokenizers"), demo_path)


@pytest.fixture(scope="session")
def vision_model(tmp_path_factory, vision_tokenizers):
    """family -> (text GGUF, projector GGUF), built once per session."""
    from tiny_vision_models import VISION_FAMILIES

    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            family = VISION_FAMILIES[name]
            folder = tmp_path_factory.mktemp(name)
            family.build(folder, vision_tokenizers)
            built[name] = (reference_gguf(folder, pre=family.pre), mmproj_gguf(folder, family.pre))
        return built[name]

    return get


def load(text: Path, mmproj: Path, **options):
    from edge_llm.engines.llamacpp import LlamaCppEngine
    from edge_llm.load_options import LoadOptions
    from edge_llm.registry import ModelSpec, ResolvedModel

    spec = ModelSpec(name=text.stem, source="local", path=str(text))
    values = {"mmproj": str(mmproj), "n_ctx": 4096, "n_parallel": 2, "spec": "off", "cache_ram": 1 << 28, **options}
    return LlamaCppEngine(ResolvedModel(text.stem, text, spec), LoadOptions(**values))


def helper_reference(text: Path, mmproj: Path, prompt: str, images, n_predict: int = N_PREDICT) -> list[int]:
    """llama.cpp's own path: mtmd_tokenize on the whole prompt, mtmd_helper_eval_chunks, then
    greedy decoding one token at a time, on a fresh context."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as m

    model = llama_cpp.llama_model_load_from_file(str(text).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 2048, 512, 512
    ctx = llama_cpp.llama_init_from_model(model, params)
    mparams = m.mtmd_context_params_default()
    mparams.use_gpu, mparams.n_threads, mparams.print_timings = False, 2, False
    mparams.media_marker = MEDIA_MARKER.encode()
    mctx = m.mtmd_init_from_file(str(mmproj).encode(), model, mparams)
    bitmaps = [m.mtmd_bitmap_init(i.width, i.height, (ctypes.c_ubyte * len(i.rgb)).from_buffer_copy(i.rgb))
               for i in images]
    chunks = m.mtmd_input_chunks_init()
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        data = (prompt if isinstance(prompt, str) else prompt.text).encode()
        text_in = m.mtmd_input_text(data, len(data), True, True)
        status = m.mtmd_tokenize(mctx, chunks, ctypes.byref(text_in), (ctypes.c_void_p * len(bitmaps))(*bitmaps),
                                 len(bitmaps))
        assert status == 0
        n_past = llama_cpp.llama_pos(0)
        assert m.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        out, pos = [], n_past.value
        for _ in range(n_predict):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(logits.argmax())
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(token)
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, pos, 1, 1
            batch.seq_id[0][0] = 0
            assert llama_cpp.llama_decode(ctx, batch) == 0
            pos += 1
        return out
    finally:
        llama_cpp.llama_batch_free(batch)
        m.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            m.mtmd_bitmap_free(b)
        m.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def greedy(engine, prompt, n: int = N_PREDICT) -> list[int]:
    return [t for d in engine.stream(prompt, SamplingParams.create(temperature=0.0, max_tokens=n)) for t in d.token_ids]


def chat(engine, *parts) -> str:
    content = "".join(MEDIA_MARKER if isinstance(p, int) else p for p in parts)
    return engine.chat_prompt([{"role": "user", "content": content}])


@pytest.mark.parametrize("family", FAMILIES)
def test_output_with_images_equals_llama_cpp(vision_model, family):
    text, mmproj = vision_model(family)
    images = [decode_image(png(1, 90, 60)), decode_image(png(2, 40, 52))]
    with load(text, mmproj) as engine:
        assert engine.takes_images
        one = chat(engine, 0, "Describe this picture.")
        two = chat(engine, "First:", 0, " and second:", 1, " What differs?")
        for prompt, used in ((one, images[:1]), (two, images)):
            ours = greedy(engine, MediaPrompt(prompt, used))
            assert ours == helper_reference(text, mmproj, prompt, used)[:len(ours)] and ours
        # another image gives another answer (the image is read at all), here or in the reference
        other = [decode_image(png(7, 90, 60))]
        assert greedy(engine, MediaPrompt(one, other)) == helper_reference(text, mmproj, one, other)[:N_PREDICT]


def test_returning_conversation_is_not_encoded_again(vision_model, monkeypatch):
    from edge_llm.engines import projector

    text, mmproj = vision_model("qwen2-vl")
    encodes = []
    real = projector.ImageChunk.encode
    monkeypatch.setattr(projector.ImageChunk, "encode", lambda self: encodes.append(1) or real(self))
    image = decode_image(png(3, 90, 60))
    with load(text, mmproj, n_parallel=1) as engine:
        first = chat(engine, 0, "Describe this picture.")
        answer = greedy(engine, MediaPrompt(first, [image]))
        assert len(encodes) == 1
        evaluated = engine.scheduler.stats.prompt_tokens_evaluated
        # the same image sent again (re-encoded as another file: the digest is of the pixels)
        again = decode_image(_as_bmp(image))
        follow = engine.chat_prompt([{"role": "user", "content": MEDIA_MARKER + "Describe this picture."},
                                     {"role": "assistant", "content": engine.detokenize(answer)},
                                     {"role": "user", "content": "And the colours?"}])
        greedy(engine, MediaPrompt(follow, [again]))
        assert len(encodes) == 1  # the slot held the image: not encoded again
        new_tokens = engine.scheduler.stats.prompt_tokens_evaluated - evaluated
        assert new_tokens < 30
        # a different image at the same place is encoded and evaluated
        greedy(engine, MediaPrompt(first, [decode_image(png(4, 90, 60))]))
        assert len(encodes) == 2
        # evicted to the prompt cache by another conversation, then restored for the first image
        greedy(engine, "Hello there, a text-only conversation.")
        before = engine.scheduler.stats.prompt_tokens_evaluated
        greedy(engine, MediaPrompt(first, [image]))
        assert len(encodes) == 2 and engine.scheduler.stats.prompt_tokens_evaluated - before <= 2


def _as_bmp(image) -> bytes:
    out = io.BytesIO()
    PILImage.frombytes("RGB", (image.width, image.height), image.rgb).save(out, "BMP")
    return out.getvalue()


def test_text_streams_while_an_image_is_encoded(vision_model, monkeypatch):
    """The vision tower runs on its own thread: a text stream goes on while it works (made slow
    here, 1.5 s, as a real one on a small CPU), and the image request then finishes too."""
    from edge_llm.engines import projector

    text, mmproj = vision_model("qwen2-vl")
    real = projector.ImageChunk.encode

    def slow(self):
        time.sleep(1.5)
        return real(self)

    monkeypatch.setattr(projector.ImageChunk, "encode", slow)
    with load(text, mmproj, n_parallel=2) as engine:
        params = SamplingParams.create(temperature=0.0, max_tokens=400, ignore_eos=True)
        stamps: list[float] = []
        streaming = threading.Thread(target=lambda: [stamps.append(time.monotonic())
                                                     for _ in engine.stream("Tell me a long story.", params)])
        streaming.start()
        while len(stamps) < 5:
            time.sleep(0.01)
        start = time.monotonic()
        image_prompt = MediaPrompt(chat(engine, 0, "Describe."), [decode_image(png(5, 90, 60))])
        answer = greedy(engine, image_prompt)
        done = time.monotonic()
        streaming.join()
        assert done - start >= 1.5 and answer
        during = [t for t in stamps if start + 0.2 < t < start + 1.4]
        assert len(during) >= 10, f"{len(during)} text tokens while the image was encoded"


def test_cancelled_while_encoding_frees_the_slot_and_the_image(vision_model, monkeypatch):
    from edge_llm.engines import projector

    text, mmproj = vision_model("gemma3")
    gate = threading.Event()
    real = projector.ImageChunk.encode
    monkeypatch.setattr(projector.ImageChunk, "encode", lambda self: gate.wait(10) and real(self))
    with load(text, mmproj, n_parallel=1) as engine:
        tokens = engine.prompt_tokens(MediaPrompt(chat(engine, 0, "Describe."), [decode_image(png(6, 90, 60))]))
        stream = engine.stream(tokens, SamplingParams.create(temperature=0.0, max_tokens=4))
        span = tokens.images[0]
        deadline = time.monotonic() + 10
        while not span.encoding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert span.encoding
        stream.close()  # the client leaves while the vision tower works
        deadline = time.monotonic() + 10
        while engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.running == 0
        gate.set()
        deadline = time.monotonic() + 10
        while span.chunk is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert span.chunk is None and span.embeddings is None  # freed once the encoder let go of it
        assert greedy(engine, "Hello") is not None  # the slot serves the next request


def test_speculation_keeps_the_output_with_images(vision_model):
    text, mmproj = vision_model("qwen2-vl")
    image = decode_image(png(8, 90, 60))
    with load(text, mmproj) as plain, load(text, mmproj, spec="ngram") as spec:
        prompt = chat(plain, 0, "Repeat after me: one two three four five six seven eight, one two three four")
        expected = greedy(plain, MediaPrompt(prompt, [image]), 40)
        assert greedy(spec, MediaPrompt(prompt, [image]), 40) == expected


@pytest.mark.timeout(BUILD_TIMEOUT_S)  # may build llama.cpp's tools first
@pytest.mark.parametrize("family", FAMILIES)
def test_http_output_equals_llama_server(vision_model, family, tmp_path):
    """The same files and image, the official openai client, edge-llm serve against llama-server."""
    import openai
    from llama_cpp_tools import tool
    from server_process import ServerProcess, free_port

    binary = tool("llama-server")
    text, mmproj = vision_model(family)
    url = "data:image/png;base64," + base64.b64encode(png(9, 90, 60)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe this picture."}]}]
    port = free_port()
    ref = subprocess.Popen([str(binary), "-m", str(text), "--mmproj", str(mmproj), "--port", str(port), "-c", "2048",
                            "-np", "1", "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = ServerProcess(["-m", str(text), "--mmproj", str(mmproj), "-c", "2048", "-np", "1", "--spec", "off"],
                         tmp_path / "serve.log")
    try:
        ours.wait_healthy()
        answers = []
        for base in (ours.url, f"http://127.0.0.1:{port}"):
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=30, timeout=60)
            r = client.chat.completions.create(model=text.stem, messages=messages, max_tokens=N_PREDICT,
                                               temperature=0.0)
            answers.append(r.choices[0].message.content)
        assert answers[0] == answers[1] and answers[0]
    finally:
        ours.stop()
        ref.terminate()
        ref.wait(timeout=30)


def test_web_page_attaches_an_image(vision_model, tmp_path, browser):  # noqa: F811
    """The chat page in headless Chromium: an image chosen in the file input goes with the next
    message; the answer is the API's own for the same image and text."""
    import httpx
    from server_process import ServerProcess
    from test_webui import assistant_messages, send, set_value, wait_for

    text, mmproj = vision_model("qwen2-vl")
    image = tmp_path / "photo.png"
    image.write_bytes(png(11, 90, 60))
    with ServerProcess(["-m", str(text), "--mmproj", str(mmproj), "-c", "2048", "-np", "2"],
                       tmp_path / "serve.log") as server:
        server.wait_healthy()
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(server.url + "/")
        wait_for(lambda: browser.execute_script("return document.getElementById('model').options.length"), 30,
                 "the model list")
        set_value(browser, "max-tokens", "10")
        set_value(browser, "temperature", "0")
        browser.find_element("id", "attach").send_keys(str(image))
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('#attachments img').length"), 10,
                 "the attached image's thumbnail")
        send(browser, "What is in this picture?")
        wait_for(lambda: assistant_messages(browser) and assistant_messages(browser)[-1]["state"] == "done", 120,
                 "the answer")
        assert browser.execute_script("return document.querySelectorAll('.msg.user .images img').length") == 1
        assert browser.execute_script("return document.querySelectorAll('#attachments img').length") == 0
        answer = assistant_messages(browser)[-1]["text"]
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        same = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": text.stem, "max_tokens": 10, "temperature": 0, "top_p": 0.95, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]}]})
        assert answer and answer == same.json()["choices"][0]["message"]["content"]
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe


def test_repl_image_command_and_batch_records(vision_model, tmp_path):
    """`chat`: /image PATH goes with the next message; `batch`: a record's images. Both answer what
    the engine answers for the same conversation and image."""
    import json

    from conftest import run_cli

    text, mmproj = vision_model("qwen2-vl")
    image = tmp_path / "photo.png"
    image.write_bytes(png(12, 90, 60))
    decoded = decode_image(image.read_bytes())
    with load(text, mmproj) as engine:
        expected = engine.detokenize(greedy(engine, MediaPrompt(chat(engine, 0, "What is this?"), [decoded]), 8))
    common = ["-m", str(text), "--mmproj", str(mmproj), "-c", "2048", "--temp", "0", "-n", "8"]
    result = run_cli("chat", *common, input=f"/image {image}\nWhat is this?\n/image {tmp_path}/missing.png\n")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert "cannot read" in result.stderr + result.stdout  # a missing file: one line, the chat goes on
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"id": "a", "prompt": "What is this?", "images": [str(image)]}) + "\n" +
                       json.dumps({"id": "b", "prompt": "What is this?", "images": [str(tmp_path / "x.png")]}) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("batch", str(records), "-o", str(out), *common)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["a"]["output"] == expected
    assert "cannot read" in rows["b"]["error"]


EXTREME_SIZES = [(1, 1), (2, 3000), (3000, 2), (16384, 1), (1, 16384), (1500, 1500)]
_EXTREME = """
import io, sys
from pathlib import Path
import numpy as np
from PIL import Image
from edge_llm.engines.llamacpp import LlamaCppEngine
from edge_llm.engines.media import MEDIA_MARKER, MediaPrompt
from edge_llm.errors import EdgeLLMError
from edge_llm.images import decode_image
from edge_llm.load_options import LoadOptions
from edge_llm.registry import ModelSpec, ResolvedModel
from edge_llm.sampling import SamplingParams
text, mmproj = Path(sys.argv[1]), sys.argv[2]
spec = ModelSpec(name="x", source="local", path=str(text))
engine = LlamaCppEngine(ResolvedModel("x", text, spec), LoadOptions(mmproj=mmproj, n_ctx=8192, n_parallel=1))
prompt = engine.chat_prompt([{"role": "user", "content": MEDIA_MARKER + "Describe."}])
for size in sys.argv[3:]:
    w, h = map(int, size.split("x"))
    data = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(data, "PNG")
    try:
        list(engine.stream(MediaPrompt(prompt, [decode_image(data.getvalue())]), SamplingParams.create(max_tokens=2)))
        print(size, "answered", flush=True)
    except EdgeLLMError as exc:
        print(size, "refused:", exc.message, flush=True)
engine.close()
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_image_shapes_are_answered_or_refused_never_a_crash(vision_model, family):
    """1x1, long thin strips and a large square through each family's preprocessor and vision tower,
    in a child process: an abort inside llama.cpp would show as a signal."""
    from conftest import ROOT

    text, mmproj = vision_model(family)
    sizes = [f"{w}x{h}" for w, h in EXTREME_SIZES]
    result = subprocess.run([sys.executable, "-c", _EXTREME, str(text), str(mmproj), *sizes], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sizes and all(" answered" in line or " refused:" in line
                                                               for line in lines), result.stdout
