"""`edge-llm pull` against a local stand-in of the Hub (HF_ENDPOINT on 127.0.0.1): what is fetched,
where it lands, that it resolves offline afterwards, resume, tokens and errors. No real network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli
from fake_hub import FakeHub

from edge_llm import hub
from edge_llm.pull import parse_pull_ref, shard_names

GGUF_REPO = "acme/Tiny-GGUF"
FILES = {
    "Tiny-Q4_K_M.gguf": b"GGUF q4_k_m " + bytes(range(256)) * 40,
    "Tiny-Q8_0.gguf": b"GGUF q8_0 " * 1000,
    "Tiny-F16-00001-of-00002.gguf": b"GGUF f16 shard 1",
    "Tiny-F16-00002-of-00002.gguf": b"GGUF f16 shard 2",
    "README.md": b"# tiny",
}


def _env(tmp_path, hub_server=None, **extra) -> dict:
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    if hub_server is not None:
        env["HF_ENDPOINT"] = hub_server.url
    return {**env, **extra}


def _resolve_offline(ref: str, env: dict) -> str:
    code = f"from edge_llm.registry import resolve; print(resolve({ref!r}).path)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env, "HF_HUB_OFFLINE": "1",
                              "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _gets(server) -> list[str]:
    return [path for method, path, _ in server.requests if method == "GET" and "/resolve/" in path]


def test_pull_one_quant_then_resolve_offline(tmp_path):
    with FakeHub({GGUF_REPO: FILES}) as server:
        env = _env(tmp_path, server)
        out = run_cli("pull", f"hf:{GGUF_REPO}:q4_k_m", env=env)
        assert out.returncode == 0, out.stderr
        path = out.stdout.strip()
        assert path.startswith(str(tmp_path / "hf-home" / "hub" / "models--acme--Tiny-GGUF" / "snapshots"))
        assert open(path, "rb").read() == FILES["Tiny-Q4_K_M.gguf"]
        assert [p.rsplit("/", 1)[-1] for p in _gets(server)] == ["Tiny-Q4_K_M.gguf"]  # nothing else fetched
    # The server is gone: the same reference resolves from the cache, and pulling again needs no network.
    assert _resolve_offline(f"hf:{GGUF_REPO}:q4_k_m", env) == path
    again = run_cli("pull", f"hf:{GGUF_REPO}:q4_k_m", env={**env, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and again.stdout.strip() == path


def test_pull_split_gguf_fetches_every_shard(tmp_path):
    with FakeHub({GGUF_REPO: FILES}) as server:
        out = run_cli("pull", f"hf:{GGUF_REPO}:f16", env=_env(tmp_path, server))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("Tiny-F16-00001-of-00002.gguf")
        assert sorted(p.rsplit("/", 1)[-1] for p in _gets(server)) == [
            "Tiny-F16-00001-of-00002.gguf", "Tiny-F16-00002-of-00002.gguf"]


def test_pull_registry_name(tmp_path):
    """`edge-llm pull qwen2-7b` fetches the file models.toml names; `-m qwen2-7b` then finds it."""
    repo = {"qwen2-7b-instruct-q5_k_m.gguf": b"GGUF pretend", "qwen2-7b-instruct-q4_0.gguf": b"GGUF other"}
    with FakeHub({"Qwen/Qwen2-7B-Instruct-GGUF": repo}) as server:
        env = _env(tmp_path, server)
        out = run_cli("pull", "qwen2-7b", env=env)
        assert out.returncode == 0, out.stderr
        assert [p.rsplit("/", 1)[-1] for p in _gets(server)] == ["qwen2-7b-instruct-q5_k_m.gguf"]
    assert _resolve_offline("qwen2-7b", env) == out.stdout.strip()
    models = run_cli("models", "--local", env={**env, "HF_HUB_OFFLINE": "1"})
    assert "qwen2-7b" in models.stdout


@pytest.mark.slow  # converts the pulled checkpoint
def test_pull_checkpoint_snapshot_with_include_then_convert(tmp_path):
    """A checkpoint snapshot (only the files asked for), resolved offline, converted to GGUF."""
    from tiny_models import build_llama, train_sentencepiece

    tiny = build_llama(tmp_path / "src", train_sentencepiece(tmp_path / "tok"))
    repo = {p.name: p.read_bytes() for p in tiny.path.iterdir()}
    repo["pytorch_model.bin"] = b"should not be downloaded"
    with FakeHub({"acme/TinyLlama-HF": repo}) as server:
        env = _env(tmp_path, server)
        out = run_cli("pull", "acme/TinyLlama-HF", "--include", "*.json", "--include", "*.safetensors",
                      "--include", "tokenizer.model", env=env)
        assert out.returncode == 0, out.stderr
    folder = out.stdout.strip()
    names = sorted(os.listdir(folder))
    assert "pytorch_model.bin" not in names and "model.safetensors" in names and "config.json" in names
    assert _resolve_offline("hf:acme/TinyLlama-HF", env) == folder
    # Converted by its reference, as every command takes one.
    out = run_cli("convert", "hf:acme/TinyLlama-HF", "-o", str(tmp_path / "tiny.gguf"), env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "tiny.gguf")
    out = run_cli("convert", "smollm2-135m", env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and "smollm2-135m is a GGUF already" in out.stderr, out.stderr
    from gguf import GGUFReader

    reader = GGUFReader(tmp_path / "tiny.gguf")
    assert reader.get_field("general.source.repo_url").contents() == "https://huggingface.co/acme/TinyLlama-HF"
    assert reader.get_field("general.name").contents() == "TinyLlama-HF"


def test_dropped_connection_resumes(tmp_path):
    """huggingface_hub retries a dropped download with a Range request from the last 10 MiB chunk it
    wrote (its resume granularity), so a 12 MiB file cut at 11 MiB is fetched again from 10 MiB only."""
    big = bytes(range(256)) * (12 * 4096)
    with FakeHub({GGUF_REPO: {**FILES, "Tiny-Q4_K_M.gguf": big}}) as server:
        server.fail_after["Tiny-Q4_K_M.gguf"] = 11 * 2**20
        out = run_cli("pull", f"hf:{GGUF_REPO}:q4_k_m", env=_env(tmp_path, server))
        assert out.returncode == 0, out.stderr
        assert open(out.stdout.strip(), "rb").read() == big
        ranges = [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith("Tiny-Q4_K_M.gguf")]
        assert ranges == [None, f"bytes={10 * 2**20}-"]


def test_token_is_sent(tmp_path):
    with FakeHub({GGUF_REPO: FILES}, token="hf_secret") as server:
        denied = run_cli("pull", f"hf:{GGUF_REPO}:q8_0", env=_env(tmp_path, server))
        assert denied.returncode == 1
        assert "set HF_TOKEN" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
        ok = run_cli("pull", f"hf:{GGUF_REPO}:q8_0", env=_env(tmp_path, server, HF_TOKEN="hf_secret"))
        assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("ref,fragment", [
    (f"hf:{GGUF_REPO}:q2_k", "has no GGUF for quant 'q2_k' (it has: Tiny-F16-00001-of-00002.gguf"),
    (f"hf:{GGUF_REPO}:Other.gguf", "has no file Other.gguf"),
    ("hf:acme/Missing:q4_0", "acme/Missing not found on the hub"),
    ("hf:nonsense", "the repo must look like ORG/NAME"),
    ("smollm2-135m", "nothing to download"),
])
def test_pull_errors_are_one_line(ref, fragment, tmp_path):
    with FakeHub({GGUF_REPO: FILES}) as server:
        out = run_cli("pull", ref, env=_env(tmp_path, server))
    assert out.returncode == 1, out.stdout
    assert fragment in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_offline_pull_of_missing_model(tmp_path):
    out = run_cli("pull", f"hf:{GGUF_REPO}:q4_k_m", env=_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode == 1
    assert "not in the cache and HF_HUB_OFFLINE is set" in out.stderr


def test_reference_parsing():
    assert parse_pull_ref("hf:a/b:Q5_K_M") == hub.HubRef("hf", "a/b", quant="q5_k_m")
    assert parse_pull_ref("a/b", source="modelscope") == hub.HubRef("modelscope", "a/b")
    assert parse_pull_ref("ms:a/b:x.gguf", revision="v1") == hub.HubRef("modelscope", "a/b", file="x.gguf",
                                                                         revision="v1")
    assert parse_pull_ref("qwen2-7b") == hub.HubRef("hf", "Qwen/Qwen2-7B-Instruct-GGUF",
                                                    file="qwen2-7b-instruct-q5_k_m.gguf")
    assert shard_names("m-00001-of-00003.gguf", []) == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shard_names("m.gguf", ["m.gguf"]) == ["m.gguf"]


def _refused_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on: every connection is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("ref", ["qwen2-0.5b", f"hf:{GGUF_REPO}:q8_0", "hf:acme/Tiny-Checkpoint",
                                 # importing modelscope and its one retry take ~10 s
                                 pytest.param(f"ms:{GGUF_REPO}:q8_0", marks=pytest.mark.slow),
                                 pytest.param("ms:acme/Tiny-Checkpoint", marks=pytest.mark.slow)])
def test_an_unreachable_hub_is_one_line(ref, tmp_path):
    """No network: one line saying which hub cannot be reached and why, for registry names, hf:
    (a GGUF or a checkpoint) and ms:; no retry warnings, no traceback."""
    url = _refused_url()
    out = run_cli("pull", ref, env=_env(tmp_path, HF_ENDPOINT=url, MODELSCOPE_ENDPOINT=url,
                                        MODELSCOPE_CACHE=str(tmp_path / "ms"),
                                        MODELSCOPE_API_MAX_RETRIES="1"), timeout=120)
    assert out.returncode == 1, out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    hub_name = f"the Hugging Face Hub at {url}" if not ref.startswith("ms:") else "ModelScope"
    assert f"error: cannot reach {hub_name} (connection refused)" in out.stderr, out.stderr


VISION_REPO = "acme/TinyVision-GGUF"
VISION_FILES = {
    "TinyVision-Q4_K_M.gguf": b"GGUF model q4_k_m",
    "TinyVision-F16.gguf": b"GGUF model f16",
    "mmproj-TinyVision-f32.gguf": b"GGUF projector f32",
    "mmproj-TinyVision-f16.gguf": b"GGUF projector f16",
    "mmproj-TinyVision-bf16.gguf": b"GGUF projector bf16",
}


def test_pull_fetches_the_projector_beside_the_model(tmp_path):
    """A GGUF from a repo with projectors comes with one (f16 for a quantized model, the model's own
    type when there is one), in the same snapshot folder; stdout stays the model's path alone, the
    projector is named on stderr. The model, not a projector, is what `:f16` and a bare repo mean."""
    with FakeHub({VISION_REPO: VISION_FILES}) as server:
        env = _env(tmp_path, server)
        out = run_cli("pull", f"hf:{VISION_REPO}:q4_k_m", env=env)
        assert out.returncode == 0, out.stderr
        model = out.stdout.strip()
        assert open(model, "rb").read() == VISION_FILES["TinyVision-Q4_K_M.gguf"]
        projector = os.path.join(os.path.dirname(model), "mmproj-TinyVision-f16.gguf")
        assert open(projector, "rb").read() == VISION_FILES["mmproj-TinyVision-f16.gguf"]
        assert out.stderr.strip() == f"mmproj: {projector}"
        assert [p.rsplit("/", 1)[-1] for p in _gets(server)] == ["TinyVision-Q4_K_M.gguf", "mmproj-TinyVision-f16.gguf"]

        server.requests.clear()
        out = run_cli("pull", f"hf:{VISION_REPO}:f16", env=env)
        assert out.returncode == 0 and out.stdout.strip().endswith("/TinyVision-F16.gguf"), out.stderr
        assert [p.rsplit("/", 1)[-1] for p in _gets(server)] == ["TinyVision-F16.gguf"]  # its projector is here

        other = _env(tmp_path / "other", server)
        out = run_cli("pull", f"hf:{VISION_REPO}:q4_k_m", "--mmproj", "mmproj-TinyVision-bf16.gguf", env=other)
        assert out.returncode == 0 and out.stderr.strip().endswith("/mmproj-TinyVision-bf16.gguf"), out.stderr
        server.requests.clear()
        out = run_cli("pull", f"hf:{VISION_REPO}:f16", "--no-mmproj", env=other)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert [p.rsplit("/", 1)[-1] for p in _gets(server)] == ["TinyVision-F16.gguf"]

        missing = run_cli("pull", f"hf:{VISION_REPO}:q4_k_m", "--mmproj", "mmproj-x.gguf", env=other)
        assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
        assert "has no projector file mmproj-x.gguf (it has: mmproj-TinyVision-f32.gguf" in missing.stderr
    assert _resolve_offline(f"hf:{VISION_REPO}:q4_k_m", env) == model


def test_projector_choice():
    files = ["m-Q4_K_M.gguf", "m-BF16.gguf", "mmproj-F32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf",
             "mmproj-Q8_0.gguf", "sub/mmproj-sub-f32.gguf", "sub/m-Q8_0.gguf"]
    assert hub.pick_mmproj(files, "m-Q4_K_M.gguf") == "mmproj-F16.gguf"  # f16 by default
    assert hub.pick_mmproj(files, "m-BF16.gguf") == "mmproj-BF16.gguf"  # else the model's own type
    assert hub.pick_mmproj(files, None, "q8_0") == "mmproj-Q8_0.gguf"
    assert hub.pick_mmproj(files, "sub/m-Q8_0.gguf") == "sub/mmproj-sub-f32.gguf"  # the model's folder first
    assert hub.pick_mmproj(["mmproj-F32.gguf", "mmproj-Q8_0.gguf"], "m-Q4_K_M.gguf") == "mmproj-Q8_0.gguf"
    assert hub.pick_mmproj(["m.gguf"], "m.gguf") is None
    assert hub.pick_gguf(files, "bf16") == "m-BF16.gguf" and hub.pick_gguf(["mmproj-F16.gguf"], "f16") is None
