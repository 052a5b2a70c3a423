"""Schema-driven fuzzing: schemathesis reads /openapi.json and sends generated (valid and invalid)
requests to a live server; no request may get a 5xx or take the server down."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from live_server import live_server

from edge_llm.load_options import LoadOptions

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_fuzzing_the_openapi_schema_finds_no_server_error(demo_path, tmp_path):
    from edge_llm.server import ModelManager, create_app

    # A small context bounds every generation (max_tokens is capped by it), so the run stays short.
    manager = ModelManager({"demo": str(demo_path)}, options=LoadOptions(n_ctx=256, n_parallel=2), keep_alive=-1)
    with live_server(create_app(manager)) as url:
        schema = httpx.get(f"{url}/openapi.json").json()
        body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].endswith("/ChatCompletionRequest")
        assert {"messages", "response_format", "tools", "stream_options"} <= set(
            schema["components"]["schemas"]["ChatCompletionRequest"]["properties"])
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "8", "--workers", "1", "--max-time", "100", "--request-timeout", "60",
             "--seed", "1", "--no-color", "--generation-database", "none"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert httpx.get(f"{url}/health").status_code == 200  # still up
