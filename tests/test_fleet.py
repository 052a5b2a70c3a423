"""Scaling out, the parts that need no cluster: conversation keys (turn 2's keys start with turn 1's
on every API shape), the prefix index, the imbalance rule, rendezvous hashing, the ASGI call a Ray
replica makes into the edge-llm app (a stream stays a stream, a reader leaving is a disconnect),
the Kubernetes manifests against the Kubernetes schemas, and the gauges the endpoint picker reads.
The real Ray cluster runs in tests/test_fleet_ray.py."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from fake_engine import FakeEngine

from edge_llm.fleet.affinity import PrefixIndex, choose, prefix_keys, prompt_items, rendezvous
from edge_llm.fleet.asgi_call import HTTPRequest, ResponseStart, call_app

REPO = Path(__file__).resolve().parents[1]


def chat(*contents: str, model: str = "m") -> dict:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return {"model": model, "messages": [{"role": roles[i], "content": c} for i, c in enumerate(contents)]}


# -- keys ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("turn1, turn2", [
    (chat("You help.", "Hi"), chat("You help.", "Hi", "Hello!", "And now?")),
    # Anthropic: system beside the messages
    ({"model": "m", "system": "S", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
     {"model": "m", "system": "S", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                 {"role": "assistant", "content": "Yo"},
                                                 {"role": "user", "content": "More"}]}),
    # Responses: instructions and input items
    ({"model": "m", "instructions": "I", "input": [{"role": "user", "content": "Hi"}]},
     {"model": "m", "instructions": "I", "input": [{"role": "user", "content": "Hi"},
                                                    {"type": "message", "role": "assistant", "content": "A"},
                                                    {"role": "user", "content": "B"}]}),
    # a raw prompt that grows: keyed by 256-character blocks
    ({"model": "m", "prompt": "x" * 600}, {"model": "m", "prompt": "x" * 600 + "y" * 300}),
])
def test_a_later_turn_starts_with_the_earlier_turns_keys(turn1, turn2):
    first, second = prefix_keys(turn1), prefix_keys(turn2)
    assert first and len(second) > len(first)
    assert second[:len(first)] == first


def test_keys_differ_where_conversations_differ():
    a, b = prefix_keys(chat("S", "question A")), prefix_keys(chat("S", "question B"))
    assert a[0] == b[0] and a[1] != b[1]  # same system prompt, other first question
    assert prefix_keys(chat("S", "q", model="m1"))[0] != prefix_keys(chat("S", "q", model="m2"))[0]


def test_a_session_header_is_one_key_whatever_the_body():
    assert prefix_keys(chat("a"), "s1") == prefix_keys(chat("b", "c"), "s1") != prefix_keys(chat("a"), "s2")
    assert len(prefix_keys(chat("a"), "s1")) == 1


@pytest.mark.parametrize("body", [None, 5, "text", [], {"messages": "not a list"}, {"prompt": None},
                                  {"messages": [1, None, {"role": {"x": 1}}]}, {"prompt": [[1, 2], [3]]}])
def test_odd_bodies_give_keys_or_none_never_an_error(body):
    assert isinstance(prefix_keys(body), list)
    assert isinstance(prompt_items(body), list)


def test_a_huge_prompt_gives_a_bounded_number_of_keys():
    assert len(prefix_keys({"prompt": "z" * 10_000_000})) <= 256


# -- index, imbalance, rendezvous ------------------------------------------------------------------------


def test_the_longest_known_prefix_wins_and_dead_replicas_are_forgotten():
    index = PrefixIndex()
    system_only = prefix_keys(chat("S"))
    conversation = prefix_keys(chat("S", "q", "a", "q2"))
    index.record(conversation[:2], "r2")
    index.record(system_only, "r1")  # the system prompt alone, served later elsewhere
    assert index.lookup(conversation) == ("r2", 2)
    assert index.lookup(conversation, alive={"r1"}) == ("r1", 1)
    index.forget("r2")
    assert index.lookup(conversation) == ("r1", 1)
    assert index.lookup(prefix_keys(chat("other"))) == (None, 0)


def test_the_index_is_bounded_least_recently_used_first():
    index = PrefixIndex(max_entries=3)
    for i in range(3):
        index.record([f"k{i}"], "r")
    index.lookup(["k0"])  # used: kept
    index.record(["k3"], "r")
    assert len(index) == 3 and index.lookup(["k1"]) == (None, 0) and index.lookup(["k0"]) == ("r", 1)


def test_choose_keeps_the_owner_unless_it_is_too_busy():
    assert choose("a", {"a": 3, "b": 1, "c": 2}, max_imbalance=2) == [["a"], ["b", "c"]]
    assert choose("a", {"a": 4, "b": 1, "c": 2}, max_imbalance=2) == [["b", "c", "a"]]
    assert choose(None, {"a": 1, "b": 0}, max_imbalance=2) == [["b", "a"]]
    assert choose("gone", {"a": 0}, max_imbalance=2) == [["a"]]
    assert choose("a", {}, max_imbalance=2) == []


def test_rendezvous_is_stable_spread_and_moves_only_a_leavers_keys():
    replicas = ["r1", "r2", "r3"]
    keys = [f"conversation-{i}" for i in range(3000)]
    owners = {k: rendezvous(k, replicas) for k in keys}
    shares = Counter(owners.values())
    assert set(shares) == set(replicas) and min(shares.values()) > 800  # about a third each
    random.shuffle(replicas)
    assert all(rendezvous(k, replicas) == owner for k, owner in owners.items())  # order does not matter
    moved = [k for k in keys if rendezvous(k, ["r1", "r3"]) != owners[k]]
    assert moved and all(owners[k] == "r2" for k in moved)
    assert rendezvous("k", []) is None


# -- the ASGI call a replica makes ----------------------------------------------------------------------------


def app_with(engine: FakeEngine):
    from edge_llm.server import ModelManager, create_app

    return create_app(ModelManager({"demo": "demo"}, loader=lambda ref: engine, keep_alive=-1))


async def collect(app, request: HTTPRequest, *, stop_after: int | None = None) -> list:
    items = []
    async with app.router.lifespan_context(app):
        stream = call_app(app, request)
        async for item in stream:
            items.append(item)
            if stop_after is not None and len(items) >= stop_after:
                await stream.aclose()
                break
    return items


def post(path: str, body: dict) -> HTTPRequest:
    return HTTPRequest("POST", path, headers=[("content-type", "application/json"), ("host", "127.0.0.1")],
                       body=json.dumps(body).encode())


def test_a_replica_call_answers_like_http():
    engine = FakeEngine("Hello there.", n_ctx=512, n_parallel=2, model_name="demo")
    items = asyncio.run(collect(app_with(engine), post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32})))
    start, *body = items
    assert isinstance(start, ResponseStart) and start.status == 200
    assert json.loads(b"".join(body))["choices"][0]["message"]["content"] == "Hello there."
    bad = asyncio.run(collect(app_with(engine), post("/v1/chat/completions", {"messages": []})))
    assert bad[0].status == 400 and "error" in json.loads(b"".join(bad[1:]))


def test_a_stream_comes_chunk_by_chunk_and_a_reader_leaving_frees_the_slot(monkeypatch):
    from edge_llm.fleet import asgi_call

    # No cancelling backstop: the generation must end because the app saw the disconnect.
    monkeypatch.setattr(asgi_call, "APP_EXIT_SECONDS", 3600.0)
    engine = FakeEngine("word ", n_ctx=2048, n_parallel=2, model_name="demo", delay=0.01)
    request = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 100_000, "ignore_eos": True, "stream": True})
    items = asyncio.run(asyncio.wait_for(collect(app_with(engine), request, stop_after=4), timeout=60))
    assert items[0].status == 200 and dict(items[0].headers)["content-type"].startswith("text/event-stream")
    assert all(isinstance(i, bytes) for i in items[1:]) and b"data: " in items[1]
    assert engine.running == 0


# -- Kubernetes -----------------------------------------------------------------------------------------------


def manifests(name: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / name).read_text()) if d]


@pytest.mark.parametrize("name", ["edge-llm.yaml", "inference-pool.yaml"])
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(name):
    import kubernetes_validate

    checked = 0
    for doc in manifests(name):
        if doc["apiVersion"].startswith(("inference.networking", "gateway.networking")):
            continue  # custom resources: test_the_inference_pool_is_what_the_picker_expects
        kubernetes_validate.validate(doc, "1.33", strict=True)
        checked += 1
    assert checked >= 3


def test_the_inference_pool_is_what_the_picker_expects():
    docs = manifests("inference-pool.yaml")
    by_kind = {d["kind"]: d for d in docs}
    pool = by_kind["InferencePool"]["spec"]
    deployment = next(d for d in manifests("edge-llm.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert [p["number"] for p in pool["targetPorts"]] == [port]
    epp_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] ==
                       pool["endpointPickerRef"]["name"])
    assert pool["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    route = by_kind["HTTPRoute"]["spec"]["rules"][0]["backendRefs"][0]
    assert (route["kind"], route["name"]) == ("InferencePool", by_kind["InferencePool"]["metadata"]["name"])
    # Every metric the picker is told to read is one edge-llm exports.
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    named = [a.split("=", 1)[1] for a in args if a.startswith("--") and a.endswith("-metric=" + a.split("=", 1)[1])
             and a.split("=", 1)[1]]
    assert set(named) == {"edge_llm:num_requests_waiting", "edge_llm:num_requests_running",
                          "edge_llm:kv_cache_usage_perc"}


def test_bad_scaling_flags_are_one_line_before_anything_starts():
    from tests.conftest import run_cli

    out = run_cli("serve", "--ray", "local", "--replicas", "3", "--max-replicas", "2", timeout=120)
    assert out.returncode != 0 and "--max-replicas 2 is below --replicas 3" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
