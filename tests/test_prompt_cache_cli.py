"""The prompt cache as users meet it: `edge-llm chat --resume` / `/load` continue a conversation
without re-reading it, and `edge-llm serve` resumes evicted conversations from host memory and,
after a restart, from --cache-dir, with /metrics counting it."""

from __future__ import annotations

import re

import httpx
import pexpect
import pytest
from conftest import run_cli
from openai import OpenAI
from server_process import ServerProcess, metric_value
from test_repl import ask, spawn_chat

pytestmark = pytest.mark.model

RESTORED = re.compile(r"\[prompt: (\d+) tokens, (\d+) cached \((\d+) restored from the prompt cache\), (\d+) evaluated")


def test_chat_resume_continues_without_reading_the_history_again(engine, tmp_path):
    cache_dir = tmp_path / "kv"
    child = spawn_chat("--temp", "0", "-n", "16", "--stats", "--cache-dir", str(cache_dir), data_dir=tmp_path)
    _, answer1, stats1 = ask(child, "Hi", verbose=False)
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D: the conversation is kept for --resume, its KV state in --cache-dir
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "edge-llm" / "last_chat.json").exists() and list(cache_dir.glob("*.kvc"))

    child = spawn_chat("--temp", "0", "-n", "16", "--stats", "--cache-dir", str(cache_dir), "--resume",
                       data_dir=tmp_path)
    child.expect_exact("> ")
    child.send("What is 2+2?\r")
    child.expect(RESTORED)
    prompt, cached, restored, evaluated = map(int, child.match.groups())
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    # The whole first exchange came back from disk: only the new turn was read, and the first
    # answer's last token when -n cut it (sampled, never evaluated; an end-of-turn token is not
    # part of the history: the template writes its own).
    between = engine.tokenize("<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                              add_bos=False)
    assert restored == cached == stats1.prompt + stats1.answer - 1
    assert evaluated == prompt - cached == len(between) + (stats1.answer == 16)


def test_chat_load_of_a_saved_conversation_restores_it_from_the_cache_dir(tmp_path):
    cache_dir, saved = tmp_path / "kv", tmp_path / "talk.json"
    first = run_cli("chat", "--temp", "0", "-n", "16", "--cache-dir", str(cache_dir),
                    input=f"Tell me about owls.\n/save {saved}\n")
    assert first.returncode == 0, first.stderr
    again = run_cli("chat", "--temp", "0", "-n", "16", "--stats", "--cache-dir", str(cache_dir),
                    input=f"/load {saved}\nAnd cats?\n")
    assert again.returncode == 0, again.stderr
    match = RESTORED.search(again.stderr)
    assert match, again.stderr
    prompt, cached, restored, evaluated = map(int, match.groups())
    assert restored == cached and evaluated < 25 < cached


def test_serve_resumes_evicted_conversations_and_counts_them(demo_path, tmp_path):
    cache_dir = tmp_path / "kv"
    args = ["-m", str(demo_path), "-np", "2", "-c", "2048", "--cache-dir", str(cache_dir)]
    questions = ["Tell me about owls.", "What is the capital of Peru?", "Write a haiku about rain."]
    follow = {"role": "user", "content": "And why is that?"}

    def first_turns(client):
        histories = []
        for q in questions:
            messages = [{"role": "user", "content": q}]
            out = client.chat.completions.create(model="", messages=messages, temperature=0, max_tokens=24)
            histories.append(messages + [{"role": "assistant", "content": out.choices[0].message.content}])
        return histories

    def second_turn(client, history):
        out = client.chat.completions.create(model="", messages=history + [follow], temperature=0, max_tokens=24)
        return out.usage.prompt_tokens, out.usage.prompt_tokens_details.cached_tokens

    with ServerProcess(args, tmp_path / "serve1.log") as server:
        server.wait_healthy()
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        histories = first_turns(client)  # three conversations over two slots: the first was evicted
        prompt, cached = second_turn(client, histories[0])
        metrics = httpx.get(server.url + "/metrics").text
        assert cached > prompt - 20
        assert metric_value(metrics, "edge_llm:prompt_cache_hits_total") == 1
        assert metric_value(metrics, "edge_llm:prompt_cache_restored_tokens_total") == cached
        assert metric_value(metrics, "edge_llm:prompt_cache_bytes", tier="ram") > 0
        assert metric_value(metrics, "edge_llm:prompt_cache_bytes", tier="disk") > 0
        assert metric_value(metrics, "edge_llm:prompt_cache_evictions_total", tier="ram") == 0
        assert server.stop() == 0

    # A restarted server reads none of the three histories again.
    with ServerProcess(args, tmp_path / "serve2.log") as server:
        server.wait_healthy()
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        for history in histories[1:]:
            prompt, cached = second_turn(client, history)
            assert cached > prompt - 20
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "edge_llm:prompt_cache_hits_total") == 2


def test_resume_without_a_saved_conversation_is_one_line(tmp_path):
    out = run_cli("chat", "--resume", input="", env={"XDG_DATA_HOME": str(tmp_path)})
    assert out.returncode == 1
    assert "no conversation to resume" in out.stderr and "Traceback" not in out.stderr
