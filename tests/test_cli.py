"""The `edge-llm` command, run as a user runs it."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.model


def test_generate_is_deterministic_with_temp_zero():
    args = ["generate", "-p", "The capital of France is", "-n", "16", "--temp", "0"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert len(first.stdout.strip()) > 0
    assert first.stderr == ""  # quiet by default: no llama.cpp log


def test_generate_chat_and_stats():
    out = run_cli("generate", "--chat", "-p", "Name a colour.", "-n", "24", "--temp", "0", "--stats")
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stderr


COPY_PROMPT = ("the keeper climbed the steps to the lamp room and wound the clockwork that turned the lens\n" * 3)


def test_generate_with_speculation_prints_the_same_text_and_counts_its_drafts(demo_path):
    args = ["generate", "-p", COPY_PROMPT, "-n", "48", "--temp", "0", "--ignore-eos", "--stats"]
    plain = run_cli(*args, "--spec", "off")
    lookup = run_cli(*args, "--spec", "ngram")
    # The bundled model drafting for itself: as slow to draft as to verify, so the plan soon stops
    # drafting; what it did draft was all kept.
    drafted = run_cli(*args, "--spec", "draft", "-md", str(demo_path), "--draft-max", "4")
    for out in (plain, lookup, drafted):
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain.stdout
    assert "drafts:" not in plain.stderr
    assert re.search(r"drafts: [1-9]\d* of \d+ kept", lookup.stderr), lookup.stderr
    counts = re.search(r"drafts: (\d+) of (\d+) kept", drafted.stderr)
    assert counts is None or counts.group(1) == counts.group(2), drafted.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--spec", "draft"], "--spec draft needs a draft model: -md MODEL"),
    (["-md", "/nonexistent/draft.gguf"], "model file not found: /nonexistent/draft.gguf"),
    (["--temp", "-1"], "invalid temperature: Input should be greater than or equal to 0 (got -1.0)"),
    (["--top-p", "1.5"], "invalid top_p"),
    (["--top-k", "0"], "invalid top_k: must be -1 (disabled) or >= 1"),
    (["-m", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
    (["-m", "hf:Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m"], "run: edge-llm pull hf:Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m"),
    (["-ctv", "q4_0", "-fa", "off"], "quantized V cache (-ctv) needs flash attention"),
    (["-ctk", "q3_x"], "invalid cache_type_k"),
])
def test_bad_input_is_one_line(args, fragment):
    out = run_cli("generate", "-p", "hi", "-n", "2", *args)
    assert out.returncode == 1
    assert fragment in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_and_truncated_model_files(tmp_path, demo_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    out = run_cli("generate", "-m", str(junk), "-p", "hi", "-n", "2")
    assert out.returncode == 1 and "is not a GGUF file" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(demo_path.read_bytes()[: 20_000_000])
    out = run_cli("generate", "-m", str(truncated), "-p", "hi", "-n", "2")
    assert out.returncode == 1 and "could not load" in out.stderr and str(truncated) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_info_reports_the_bundled_model(demo_path):
    out = run_cli("info", str(demo_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "architecture      llama" in text
    assert "layers            30" in text
    assert "file type         Q4_1" in text
    assert "chat template     ChatML" in text
    data = json.loads(run_cli("info", "--json").stdout)  # no model: the demo model
    assert data["architecture"] == "llama" and data["n_layers"] == 30 and data["file_type"] == "Q4_1"
    assert 130e6 < data["n_params"] < 140e6
    assert data["n_tensors"] == 272


def test_info_on_a_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    out = run_cli("info", str(bad))
    assert out.returncode == 1 and "not a readable GGUF" in out.stderr


def test_models_lists_registry_and_demo_presence(demo_path):
    out = run_cli("models")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout and "qwen2-7b" in out.stdout
    assert str(demo_path) in out.stdout
    assert "edge-llm pull qwen2-7b" in out.stdout


def test_doctor():
    out = run_cli("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["llama_cpp_python"] == "0.3.36"
    assert isinstance(report["gpu_offload"], bool)
    assert report["cpu_threads"] >= 1
    assert report["cpu_features"] and all(re.fullmatch(r"[A-Z0-9_]+", f) for f in report["cpu_features"])
    from edge_llm.commands.doctor import cpu_features

    two_backends = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 |"
    assert cpu_features(two_backends) == ["AVX", "SSE3", "USE_GRAPHS"]


def test_unknown_command_and_help():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and out.stderr == "edge-llm: unknown command 'frobnicate' (see edge-llm --help)\n"
    out = run_cli("generat")
    assert out.stderr == "edge-llm: unknown command 'generat' (did you mean generate? see edge-llm --help)\n"
    out = run_cli("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "aliases:" in out.stdout


@pytest.mark.parametrize("args, line", [
    (["generate", "--tmp", "0", "-p", "x"],
     "edge-llm generate: error: unrecognized arguments: --tmp; did you mean --temp? (see edge-llm generate --help)"),
    (["serve", "--port", "eighty"],
     "edge-llm serve: error: argument --port: invalid int value: 'eighty' (see edge-llm serve --help)"),
    (["generate", "hello", "-p", "hi"],
     "edge-llm generate: error: one prompt at a time: PROMPT and -p both given (see edge-llm generate --help)"),
    (["quantize", "a.gguf", "b.gguf", "q4_0", "-o", "c.gguf"],
     "edge-llm quantize: error: expected INPUT [OUT] TYPE, with OUT either there or as -o "
     "(see edge-llm quantize --help)"),
])
def test_a_bad_flag_is_one_line_with_a_hint_not_the_usage(args, line):
    out = run_cli(*args, input="")
    assert out.returncode == 2
    assert out.stderr == line + "\n"


def test_the_prompt_as_an_argument_from_a_file_or_from_stdin(tmp_path):
    """llama-cli's -f, a plain argument and a pipe (`-f -`, or nothing given) are the same prompt."""
    text = "The capital of France is"
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    sampling = ["-n", "8", "--temp", "0"]
    reference = run_cli("generate", "-p", text, *sampling)
    assert reference.returncode == 0 and reference.stdout.strip(), reference.stderr
    for args, stdin in [([text], None), (["-f", str(tmp_path / "prompt.txt")], None), (["-f", "-"], text),
                        ([], text), ([text, "-no-cnv"], None)]:
        out = run_cli("generate", *args, *sampling, input=stdin)
        assert (out.returncode, out.stdout) == (0, reference.stdout), (args, out.stderr)


def test_ollamas_and_llama_cpps_words_run_the_same_commands(demo_path):
    """`run`, `list`, `show`, `server` are other command lines of edge-llm's own commands."""
    sampling = ["-n", "8", "--temp", "0"]
    one_shot = run_cli("run", "smollm2-135m", "Name a colour.", *sampling)
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout == run_cli("generate", "-m", "smollm2-135m", "--chat", "-p", "Name a colour.",
                                      *sampling).stdout
    chat = run_cli("run", "smollm2-135m", *sampling, input="Say hello.\n")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    assert chat.stdout == run_cli("chat", "-m", "smollm2-135m", *sampling, input="Say hello.\n").stdout
    listed = run_cli("list")
    assert listed.returncode == 0 and listed.stdout == run_cli("models", "--local").stdout
    assert str(demo_path) in listed.stdout and "qwen2-7b" not in listed.stdout
    shown = run_cli("show", "smollm2-135m")
    assert shown.returncode == 0 and shown.stdout == run_cli("info", "smollm2-135m").stdout
    assert "edge-llm serve" in run_cli("server", "--help").stdout


# -- files: every input is bytes that may be invalid; every OS error is one line naming the file ----


@pytest.mark.parametrize("command, what", [
    (["generate", "-n", "1", "-f"], "prompt file"),
    (["chat", "-n", "1", "-f"], "prompt file"),
    (["perplexity", "-f"], "text file"),
    (["models", "--config"], "model registry"),
    (["serve", "--port", "9", "--api-key-file"], "API key file"),
])
def test_input_files_with_invalid_bytes_or_not_files_are_one_line(command, what, tmp_path):
    bad = tmp_path / "input.txt"
    bad.write_bytes(b"# first line\nk\xffey\n")
    out = run_cli(*command, str(bad), input="")
    assert out.returncode == 1
    assert out.stderr == (f"edge-llm {command[0]}: error: {what} {bad} is not UTF-8 text: "
                          f"invalid byte 0xff at line 2, column 2\n")
    out = run_cli(*command, str(tmp_path), input="")  # a folder where a file belongs
    assert out.returncode == 1
    assert out.stderr == f"edge-llm {command[0]}: error: cannot read {what} {tmp_path}: Is a directory\n"


def test_os_errors_no_command_handled_are_one_line_naming_the_file(monkeypatch, capsys):
    import errno

    from edge_llm import cli, info

    for code, reason in [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]:
        def fail(argv, code=code):
            raise OSError(code, os.strerror(code), "/data/out.gguf")

        monkeypatch.setattr(info, "main", fail)
        assert cli.main(["info"]) == 1
        assert capsys.readouterr().err == f"edge-llm info: error: /data/out.gguf: {reason}\n"


def test_output_check_and_writes_name_the_file_for_each_os_error(tmp_path, monkeypatch):
    """The one place that turns OS errors into a line (edge_llm/files.py), on each error a write can
    meet; the errors are injected where a real disk would raise them."""
    import errno

    from edge_llm import files
    from edge_llm.errors import EdgeLLMError

    target = tmp_path / "out.gguf"
    assert files.check_output_path(target) == target and list(tmp_path.iterdir()) == []  # the probe is gone
    real_open = os.open
    for code in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        def refuse(path, flags, mode=0o777, code=code):
            if str(path).startswith(str(tmp_path)):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, mode)

        monkeypatch.setattr(files.os, "open", refuse)
        with pytest.raises(EdgeLLMError) as info:
            files.check_output_path(target)
        assert info.value.message == f"cannot write {target}: {os.strerror(code)}"
        monkeypatch.undo()
    with pytest.raises(EdgeLLMError, match=f"^cannot write {target}: No space left on device$"):
        with files.os_errors(target, "write"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() error names no file
    assert files.json_bytes({"a": "\ud800 世"}) == b'{"a": "\\ud800 \\u4e16"}'
    assert files.json_bytes({"a": "世"}) == '{"a": "世"}'.encode()


def test_chat_saves_a_conversation_typed_with_invalid_bytes(tmp_path):
    saved = tmp_path / "conv.json"
    done = subprocess.run([sys.executable, "-m", "edge_llm", "chat", "-n", "2", "--temp", "0"],
                          input=f"hi \xff there\n/save {saved}\n".encode("latin-1"), capture_output=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    messages = json.loads(saved.read_bytes().decode("utf-8"))["messages"]
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith("hi ")
    assert len(messages) == 2


def test_serve_on_a_port_in_use_is_one_line_before_any_banner():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("serve", "--port", str(port), timeout=120)
    assert out.returncode == 1
    assert out.stderr == (f"edge-llm serve: error: cannot listen on 127.0.0.1:{port}: the address is in use "
                          "(another server?); choose another --port\n")
