"""`edge-llm batch`: parsing, resumption after a kill, per-record parameters, the --url path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_llm.batch import BatchRunner, EngineBackend, load_done, parse_record, record_key
from edge_llm.sampling import SamplingParams
from tests.conftest import ROOT, run_cli


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- parsing and resumption, no model ---------------------------------------------------------------


def test_parse_record_prompt_messages_and_carried_fields():
    r = parse_record('{"id": 7, "prompt": "hi", "temperature": 0, "max_tokens": 3, "tag": "x"}', 1)
    assert r.error is None and r.prompt == "hi" and r.messages is None
    assert r.sampling == {"temperature": 0, "max_tokens": 3}
    assert r.key == record_key({"id": 7})
    r = parse_record('{"messages": [{"role": "user", "content": "hi"}]}', 4)
    assert r.error is None and r.messages[0]["content"] == "hi" and r.key == "line:4"


@pytest.mark.parametrize("raw, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"text": "no prompt"}', "neither `prompt` nor `messages`"),
    ('{"prompt": 5}', "`prompt` must be a string"),
    ('{"messages": "hi"}', "`messages` must be"),
])
def test_parse_record_reports_malformed_lines_with_their_number(raw, message):
    r = parse_record(raw, 12)
    assert r.error is not None and message in r.error and "line 12" in r.error


def test_template_builds_prompt_from_other_fields():
    r = parse_record('{"task_id": "T/0", "prompt": "def f():\\n", "entry_point": "f"}', 1,
                     template="# {entry_point}\n{prompt}")
    assert r.prompt == "# f\ndef f():\n"
    r = parse_record('{"question": "why?"}', 2, template="Q: {question}\nA:", chat=True, system="Be brief.")
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: why?\nA:"}]
    r = parse_record('{"prompt": "x"}', 3, template="{missing}")
    assert "needs field 'missing'" in r.error


def test_load_done_drops_error_records_and_a_truncated_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "line": 1, "output": "x"}\n'
                   '{"line": 2, "output": "y"}\n'
                   '{"line": 3, "error": "line 3: not valid JSON", "error_type": "invalid_record"}\n'
                   '{"id": "b", "line": 4, "outp', encoding="utf-8")
    assert load_done(out) == {'id:"a"', "line:2"}
    assert [r["line"] for r in read_jsonl(out)] == [1, 2]  # rewritten: those records run again


# -- in-process, on the shared engine ----------------------------------------------------------------


@pytest.mark.model
def test_runner_honours_per_record_parameters(engine, tmp_path):
    from edge_llm.batch import OutputWriter, read_records

    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "short", "prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True},
        {"id": "long", "prompt": "Once upon a time", "max_tokens": 9, "ignore_eos": True},
        {"id": "two", "prompt": "The sky is", "n": 2, "max_tokens": 4, "temperature": 1.0, "seed": 1},
        {"id": "stop", "prompt": "1, 2, 3, 4,", "stop": [","], "max_tokens": 20, "temperature": 0},
        {"id": "bad", "prompt": "x", "top_p": 7},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    runner = BatchRunner(EngineBackend(engine), SamplingParams.create(max_tokens=16), {}, concurrency=4)
    writer = OutputWriter(out)
    summary = runner.run(read_records(inp), writer, set())
    writer.close()
    assert (summary.done, summary.errors) == (4, 1)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert rows["short"]["usage"]["completion_tokens"] == 3 and rows["short"]["finish_reason"] == "length"
    assert rows["long"]["usage"]["completion_tokens"] == 9
    assert len(rows["two"]["choices"]) == 2 and rows["two"]["usage"]["completion_tokens"] <= 8
    assert rows["stop"]["finish_reason"] == "stop" and "," not in rows["stop"]["output"]
    assert "invalid top_p" in rows["bad"]["error"] and rows["bad"]["error_type"] == "invalid_parameter"
    for row in rows.values():
        if "error" not in row:
            assert row["timing"]["latency_s"] > 0 and row["usage"]["prompt_tokens"] > 0


# -- the command, killed halfway and resumed ---------------------------------------------------------


def _twenty_records(path: Path) -> tuple[set[str], set[int]]:
    """17 valid records (ids on most, line numbers on the rest) and 3 malformed lines at the end."""
    lines, valid, malformed = [], set(), set()
    for i in range(17):
        record = {"prompt": f"Item {i}: the number {i} is", "max_tokens": 12 + i % 4, "ignore_eos": True,
                  "temperature": 0, "meta": {"i": i}}
        if i % 3:
            record["id"] = f"r{i}"
        lines.append(json.dumps(record))
        valid.add(record_key(record) if "id" in record else f"line:{len(lines)}")
    for bad in ('{"prompt": "unterminated', '["a list"]', '{"id": "nop"}'):
        lines.append(bad)
        malformed.add(len(lines))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return valid, malformed


@pytest.mark.model
@pytest.mark.slow
def test_batch_killed_halfway_resumes_with_each_record_once(demo_path, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    valid, malformed = _twenty_records(inp)
    args = [sys.executable, "-m", "edge_llm", "batch", str(inp), "-o", str(out), "-m", str(demo_path),
            "-np", "2", "-c", "1024", "-n", "64", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: what is on disk must be enough
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = read_jsonl(out) if out.read_text(encoding="utf-8").endswith("\n") else None
    n_first = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 5 <= n_first < 20, "the run was not cut off halfway"

    result = run_cli("batch", str(inp), "-o", str(out), "-m", str(demo_path), "-np", "2", "-c", "1024",
                     "-n", "64", "--no-progress", "--sort")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert len(rows) == 20
    keys = [record_key(r) if "id" in r else f"line:{r['line']}" for r in rows if "error" not in r]
    assert sorted(keys) == sorted(valid)  # every valid record exactly once
    errors = [r for r in rows if "error" in r]
    assert {r["line"] for r in errors} == malformed
    assert all(f"line {r['line']}" in r["error"] for r in errors)
    assert [r["line"] for r in rows] == sorted(r["line"] for r in rows)  # --sort: input order
    for r in rows:
        if "error" not in r:  # per-record max_tokens won over -n 64; carried fields came through
            i = r["meta"]["i"]
            assert r["usage"]["completion_tokens"] == 12 + i % 4 and r["finish_reason"] == "length"
            assert r["prompt"] == f"Item {i}: the number {i} is"
    if first is not None:  # records finished before the kill were kept as they were, not redone
        before = {record_key(r) if "id" in r else f"line:{r['line']}": r for r in first if "error" not in r}
        after = {record_key(r) if "id" in r else f"line:{r['line']}": r for r in rows}
        assert all(after[k]["timing"] == v["timing"] for k, v in before.items())


# -- against a running `edge-llm serve` ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.model
@pytest.mark.slow
def test_batch_against_edge_llm_serve(demo_path, tmp_path):
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "edge_llm", "serve", "-m", str(demo_path), "--host",
                               "127.0.0.1", "--port", str(port), "-np", "2", "-c", "2048"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "edge-llm serve did not become healthy"
            time.sleep(0.5)
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        inp.write_text("\n".join(json.dumps(r) for r in [
            {"id": 1, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0},
            {"id": 2, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 7},
            {"id": 3, "prompt": "Count: 1, 2,", "max_tokens": 4, "ignore_eos": True},
            {"id": 4, "prompt": "x", "temperature": -1},
        ]) + "\nnot json\n", encoding="utf-8")
        result = run_cli("batch", str(inp), "-o", str(out), "--url", f"http://127.0.0.1:{port}", "-np", "2",
                         "--no-progress", "--sort")
        assert result.returncode == 0, result.stderr
        rows = read_jsonl(out)
        assert [r.get("id") for r in rows] == [1, 2, 3, 4, None]
        assert rows[0]["output"].strip() and rows[0]["usage"]["completion_tokens"] <= 5
        assert rows[1]["output"].strip() and rows[1]["usage"]["completion_tokens"] <= 7
        assert rows[2]["usage"]["completion_tokens"] == 4
        assert "invalid temperature" in rows[3]["error"]
        assert "not valid JSON" in rows[4]["error"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.model
@pytest.mark.slow
def test_sigterm_stops_cleanly_with_only_whole_lines(demo_path, tmp_path):
    """SIGTERM (like Ctrl-C) cancels the records in flight and exits 130; what is on disk is whole lines."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Story {i}:", "max_tokens": 48, "ignore_eos": True}) + "\n"
                           for i in range(12)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_llm", "batch", str(inp), "-o", str(out), "-m",
                             str(demo_path), "-np", "2", "-c", "1024", "--no-progress"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()
    data = out.read_text(encoding="utf-8")
    assert data.endswith("\n") and 2 <= data.count("\n") < 12
    rows = read_jsonl(out)
    assert len({r["id"] for r in rows}) == len(rows) and all(r["finish_reason"] == "length" for r in rows)
