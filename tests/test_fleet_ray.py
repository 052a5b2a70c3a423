"""edge-llm on a real Ray cluster on loopback (a head and a second node, ray.cluster_utils), two
replicas of the bundled model behind Serve's HTTP proxy, driven with the official openai client:

- 12 conversations x 2 turns, each with its own long first message. With the affinity router
  every second turn finds its first turn's KV state (usage.prompt_tokens_details.cached_tokens
  covers the first turn's prompt), as on a single `edge-llm serve`; with Serve's default router
  (power of two choices) some second turns land on the replica that never saw the conversation.
  The turn-2 / turn-1 time-to-first-token ratios of the three setups are printed, not asserted
  (timings are for benchmarks: scripts/bench_fleet.py).
- Six streams of one session (X-Session-ID): the router keeps them together only up to its
  imbalance bound, so both replicas serve some. One replica is killed while they run: its streams
  end with an error event, the other's finish, none hangs, and every request sent after the kill
  is answered.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

N_CONVERSATIONS = 12
SERVER_FLAGS = ["-np", "4", "-c", "16384", "--temp", "0"]
WORDS = ("river stone lantern orchard copper meadow whistle harbor tidal ember velvet canyon maple "
         "signal quarry thistle beacon saddle glacier ribbon").split()


def conversation_opening(seed: int) -> str:
    """A first message of ~400 tokens that no other conversation shares."""
    rng = random.Random(seed)
    return f"Notes {seed}: " + " ".join(rng.choice(WORDS) for _ in range(300)) + "\nSummarise the notes."


def chat(client: openai.OpenAI, messages: list[dict]) -> tuple[float, str, int, int]:
    """One streamed turn: (time to first token, answer, prompt tokens, cached prompt tokens)."""
    start = time.perf_counter()
    first, parts, usage = None, [], None
    for chunk in client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return (first or time.perf_counter()) - start, "".join(parts), usage.prompt_tokens, cached


def two_turns(base_url: str, seed: int, gap: threading.Barrier) -> dict:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=300, max_retries=0)
    messages = [{"role": "user", "content": conversation_opening(seed)}]
    ttft1, answer, prompt1, _ = chat(client, messages)
    gap.wait()  # every first turn is done before any second turn: slots and caches are contested
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And in one word?"}]
    ttft2, _, prompt2, cached2 = chat(client, messages)
    return {"ttft1": ttft1, "ttft2": ttft2, "prompt1": prompt1, "prompt2": prompt2, "cached2": cached2}


def run_conversations(base_url: str, first_seed: int) -> list[dict]:
    gap = threading.Barrier(N_CONVERSATIONS)
    with ThreadPoolExecutor(N_CONVERSATIONS) as pool:
        return list(pool.map(lambda i: two_turns(base_url, first_seed + i, gap), range(N_CONVERSATIONS)))


def resumed(turns: list[dict]) -> int:
    """Second turns that found their first turn's prompt cached (all of it but the last token or so)."""
    return sum(t["cached2"] >= t["prompt1"] - 4 for t in turns)


def ratio(turns: list[dict]) -> float:
    return statistics.median(t["ttft2"] for t in turns) / statistics.median(t["ttft1"] for t in turns)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False, logging_level="warning")
    from server_process import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def deploy(router: str) -> None:
    from ray import serve

    from edge_llm.fleet.deployment import application
    from edge_llm.server.serve import build_parser

    argv = [*SERVER_FLAGS, "--replicas", "2", "--replica-cpus", "1", "--router", router, "--preload"]
    serve.run(application(build_parser().parse_args(argv), argv), name="edge-llm", route_prefix="/")


def replica_actors() -> list:
    import ray
    from ray.util import list_named_actors

    names = [a["name"] for a in list_named_actors(all_namespaces=True) if "EdgeReplica" in a["name"]]
    return [ray.get_actor(name, namespace="serve") for name in names]


def test_conversations_stay_where_their_kv_state_is(cluster, tmp_path):
    from server_process import ServerProcess

    deploy("affinity")
    affinity = run_conversations(cluster, 1000)
    deploy("pow2")
    default = run_conversations(cluster, 2000)
    single_server = ServerProcess([*SERVER_FLAGS, "-t", "1"], tmp_path / "serve.log").wait_healthy()
    try:
        single = run_conversations(single_server.url, 3000)
    finally:
        single_server.stop()
    print(f"\nturn-2/turn-1 TTFT: single server {ratio(single):.3f}, affinity {ratio(affinity):.3f}, "
          f"Serve's default router {ratio(default):.3f}; second turns resumed from cache: "
          f"{resumed(single)}, {resumed(affinity)}, {resumed(default)} of {N_CONVERSATIONS}")
    assert resumed(single) == N_CONVERSATIONS
    # The 12 second turns arrive together, and the router sends a request away from its conversation's
    # replica while that one has more than max_imbalance (2) requests beyond the other (router.py):
    # in a burst whose order happens to lead one replica by 3, one turn goes to the other replica (seen
    # in CI: 11 of 12). That guard is by design; what affinity must do is keep the rest where they were.
    assert resumed(affinity) >= N_CONVERSATIONS - 2
    # With two replicas, each second turn has even odds of the wrong one: all 12 right is 1 in 4096.
    assert resumed(default) < N_CONVERSATIONS
    assert resumed(affinity) > resumed(default)


def test_a_replica_killed_mid_stream_ends_its_streams_and_loses_no_new_request(cluster):
    import ray

    deploy("affinity")
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", timeout=120, max_retries=0)
    outcomes: list[str] = []

    def long_stream(i: int) -> None:
        try:
            chunks = list(client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": f"Story {i}: tell it long."}],
                max_tokens=300, stream=True, extra_body={"ignore_eos": True},
                extra_headers={"X-Session-ID": "one session"}))
            outcomes.append("finished" if chunks[-1].choices[0].finish_reason == "length" else "cut")
        except openai.APIError:
            outcomes.append("error event")  # the replica died: its stream ended with an error event

    streams = [threading.Thread(target=long_stream, args=(i,)) for i in range(6)]
    for thread in streams:
        thread.start()
    time.sleep(3)  # streams are running on both replicas
    ray.kill(replica_actors()[0], no_restart=False)
    after = [chat(client, [{"role": "user", "content": f"Hello {i}"}]) for i in range(4)]
    for thread in streams:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in streams), "a stream hung after its replica died"
    # One session for all six, but the router bounds the imbalance (2): both replicas got streams,
    # so the killed one had some and the other finished its own.
    assert len(outcomes) == 6 and "cut" not in outcomes, outcomes
    assert "error event" in outcomes and "finished" in outcomes, outcomes
    assert all(answer for _, answer, _, _ in after)
