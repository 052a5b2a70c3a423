"""`edge-llm serve` refuses at start what would otherwise fail at the first request, or start an
open server by mistake: one line naming the problem, a non-zero exit, no traceback, no port held."""

from __future__ import annotations

import pytest
from conftest import run_cli
from server_process import free_port, write_models_toml

pytestmark = pytest.mark.slow


def refused(*args: str, env: dict | None = None) -> str:
    out = run_cli("serve", "--port", str(free_port()), *args, env=env, timeout=180)
    assert out.returncode != 0, (args, env, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip() and "edge-llm serve: http://" not in line]
    assert len(lines) == 1 and lines[0].startswith("edge-llm serve: error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return lines[0].removeprefix("edge-llm serve: error: ")


def test_bad_settings_are_one_line_at_start(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "cache directory" in refused("--cache-dir", str(a_file))
    assert "no file can be written" in refused("--cache-dir", "/proc/self")
    assert "--cache-disk must be a positive size" in refused("--cache-dir", str(tmp_path / "c"), "--cache-disk", "0")
    assert "-md" in refused("-md", str(tmp_path / "missing.gguf"))
    assert "cache_type_k" in refused(env={"EDGE_LLM_CACHE_TYPE_K": "q9"})
    assert "unknown chat format 'nope'" in refused(env={"EDGE_LLM_CHAT_FORMAT": "nope"})
    assert "--api-key is empty" in refused("--api-key", "")
    assert "EDGE_LLM_API_KEY is empty" in refused(env={"EDGE_LLM_API_KEY": ""})
    assert "EDGE_LLM_CTX_SIZE" in refused(env={"EDGE_LLM_CTX_SIZE": str(2**32 + 5)})
    assert "-c/--ctx-size" in refused("-c", str(2**32 + 5))
    config = tmp_path / "bad.toml"
    config.write_text("models = 5\n")
    assert "`models` must be a table" in refused("--config", str(config))
    config.write_text("[models]\ndemo = 5\n")
    assert "expected a [models.demo] table" in refused("--config", str(config))


@pytest.mark.model
def test_a_model_that_cannot_load_or_fit_is_one_line(tmp_path, demo_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(demo_path.read_bytes()[: 3 << 20])
    assert "could not load" in refused("-m", str(truncated), "--preload")
    # llama.cpp's n_ctx is 32 bits: 2**32 + 10**8 was taken as 10**8 and allocated for minutes.
    config = write_models_toml(tmp_path / "models.toml", {"demo": demo_path}, n_ctx=100_000_000)
    message = refused("--config", str(config), "--preload")
    assert "a context of 100000000 tokens needs 2145.8 GiB of KV cache" in message and "at most -c " in message
