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

from edge_llm.commands.batch import BatchRunner, EngineBackend, load_done, parse_record, record_key
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
    from edge_llm.commands.batch import OutputWriter, read_records

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
            {"id": 5, "prompt": "A lone \ud800 surrogate", "max_tokens": 2},  # JSON can carry it; UTF-8 cannot
        ]) + "\nnot json\n", encoding="utf-8")
        result = run_cli("batch", str(inp), "-o", str(out), "--url", f"http://127.0.0.1:{port}", "-np", "2",
                         "--no-progress", "--sort")
        assert result.returncode == 0, result.stderr
        rows = read_jsonl(out)
        assert [r.get("id") for r in rows] == [1, 2, 3, 4, 5, None]
        assert rows[0]["output"].strip() and rows[0]["usage"]["completion_tokens"] <= 5
        assert rows[1]["output"].strip() and rows[1]["usage"]["completion_tokens"] <= 7
        assert rows[2]["usage"]["completion_tokens"] == 4
        assert "invalid temperature" in rows[3]["error"]
        assert rows[4].get("error_type") != "internal_error", rows[4]  # it reached the server
        assert "not valid JSON" in rows[5]["error"]
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


# -- hostile files: invalid bytes in, unwritable or full outputs ----------------------------------------


@pytest.mark.model
def test_invalid_utf8_lines_become_error_records_and_the_rest_runs(demo_path, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "One,", "max_tokens": 2}\n'  # a BOM: not an error
                    b'{"id": 2, "prompt": "bad \xff\xfe bytes"}\n'
                    b'\xc3(\n'
                    b'{"id": 4, "prompt": "Four,", "max_tokens": 2}\n')
    result = run_cli("batch", str(inp), "-o", str(out), "-m", str(demo_path), "-c", "512", "--no-progress",
                     "--sort")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [(r["line"], r.get("id")) for r in rows] == [(1, 1), (2, None), (3, None), (4, 4)]
    assert rows[1]["error"] == "line 2: not UTF-8 text (byte 0xff at column 26)"
    assert rows[2]["error"] == "line 3: not UTF-8 text (byte 0xc3 at column 1)"
    assert rows[0]["usage"]["completion_tokens"] == rows[3]["usage"]["completion_tokens"] == 2


@pytest.mark.model
def test_lone_surrogates_are_written_escaped_and_resumes_pass_them(demo_path, tmp_path):
    """JSON can carry a lone surrogate ("\\ud800"), which UTF-8 cannot: the record must still be
    written, read back as itself, and count as done when the batch is resumed."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "\\ud800", "prompt": "A \\udfff", "max_tokens": 2, "tag": "\\ud83d"}\n'
                   '{"id": 2, "prompt": "Two,", "max_tokens": 2, "tag": "\\u4e16"}\n', encoding="utf-8")
    args = ("batch", str(inp), "-o", str(out), "-m", str(demo_path), "-c", "512", "--no-progress")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    data.decode("utf-8")  # the output is valid UTF-8
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert rows["\ud800"]["tag"] == "\ud83d" and rows["\ud800"]["prompt"] == "A \udfff"
    assert rows["\ud800"]["usage"]["completion_tokens"] == 2 and "error" not in rows["\ud800"]
    assert "世" in data.decode("utf-8")  # other records keep their text unescaped
    for _ in range(2):
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert "0 done, 0 errors, 2 already" in again.stderr
        assert out.read_bytes() == data


@pytest.mark.parametrize("target, reason", [
    ("folder", "{out}: it is a folder"),
    ("missing/out.jsonl", "{out}: folder {tmp}/missing does not exist"),
    ("a-file/out.jsonl", "{out}: folder {tmp}/a-file is a file, not a folder"),
])
def test_unwritable_output_is_one_line_before_the_model_loads(target, reason, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / target
    # A model that is not there: the output is refused first, so no load is attempted.
    result = run_cli("batch", str(inp), "-o", str(out), "-m", str(tmp_path / "absent.gguf"), "--no-progress")
    assert result.returncode == 1
    assert result.stderr == f"edge-llm batch: error: cannot write {reason.format(out=out, tmp=tmp_path)}\n"
    assert sorted(tmp_path.rglob("*")) == before


def test_read_only_output_folder_is_one_line(read_only_folder):
    folder, run = read_only_folder
    inp = folder / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n', encoding="utf-8")
    result = run("batch", str(inp), "-o", str(folder / "out.jsonl"), "--no-progress")
    assert result.returncode == 1
    assert result.stderr == f"edge-llm batch: error: cannot write {folder / 'out.jsonl'}: Permission denied\n"
    assert [p.name for p in folder.iterdir()] == ["in.jsonl"]


FULL_DISK = """
import resource, signal, sys
from edge_llm.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.model
def test_full_disk_mid_run_is_one_line_and_a_resume_finishes(demo_path, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Item {i},", "max_tokens": 2, "ignore_eos": True}) + "\n"
                           for i in range(8)), encoding="utf-8")
    args = ["batch", str(inp), "-o", str(out), "-m", str(demo_path), "-c", "512", "-np", "2", "--no-progress"]
    full = subprocess.run([sys.executable, "-c", FULL_DISK, "700", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert full.returncode == 1, full.stderr
    assert full.stderr == f"edge-llm batch: error: cannot write {out}: File too large\n"
    assert 0 < out.stat().st_size <= 700
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == list(range(8)) and not any("error" in r for r in rows)
