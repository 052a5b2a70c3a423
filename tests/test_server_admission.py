"""One bad request must not hurt the streams running beside it on its model (issue 12, item 3):
a json_schema whose grammar llama.cpp cannot parse fails while the scheduler admits it; admission
is all or nothing, so the request gets its 400 and the running stream ends normally."""

from __future__ import annotations

import json

import httpx
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.model

# A valid schema whose grammar is left-recursive (A ::= A | null): llama.cpp's parser refuses it.
LEFT_RECURSIVE = {"$ref": "#/$defs/A", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}


def test_an_unparseable_json_schema_gets_400_and_the_stream_beside_it_finishes(demo_path, tmp_path):
    body = {"model": "", "messages": [{"role": "user", "content": "Tell me a long story about a fox."}],
            "max_tokens": 256, "temperature": 0, "stream": True, "ignore_eos": True}
    bad = {"model": "", "messages": [{"role": "user", "content": "Say a."}], "max_tokens": 8,
           "response_format": {"type": "json_schema", "json_schema": {"name": "q", "schema": LEFT_RECURSIVE}}}
    with ServerProcess(["-m", str(demo_path), "-np", "2", "-c", "1024"], tmp_path / "serve.log") as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            alone = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json=body).text.splitlines()
                     if line.startswith("data: {")]
            with client.stream("POST", "/v1/chat/completions", json=body) as running:
                assert running.status_code == 200
                lines = running.iter_lines()
                chunks = []
                for line in lines:  # the stream is generating before the bad request arrives
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        if chunks[-1]["choices"] and chunks[-1]["choices"][0]["delta"].get("content"):
                            break
                refused = client.post("/v1/chat/completions", json=bad)
                rest = [line for line in lines if line]
            chunks += [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
            # After it all, the model still answers.
            after = client.post("/v1/chat/completions", json={**bad, "response_format": {"type": "json_object"}})

    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and "grammar" in error["message"]
    assert rest[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")] == ["length"]

    def text(stream):
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in stream)

    assert text(chunks) == text(alone)  # greedy: undisturbed by the refused request
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("stop", "length")
