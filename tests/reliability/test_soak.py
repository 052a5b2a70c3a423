"""Soak: a bounded run of mixed requests against a real `edge-llm serve` process on loopback.

200 requests (chat and completions, streamed and not, prompts of 1-40 words, 1-16 output tokens,
ignore_eos so every answer has an exact length) at concurrency 8 on 4 slots, 10% of them
cancelled mid-stream. Afterwards: no slot or queue entry is left behind, every request is
accounted for in /metrics, every non-cancelled one produced exactly its max_tokens, greedy output
is unchanged, and the server's RSS grew by less than RSS_GROWTH_BOUND after a warm-up, beyond
what the prompt cache may hold by design (its budget, CACHE_RAM, which the run fills).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest
from server_process import ServerProcess, metric_value, write_models_toml

pytestmark = [pytest.mark.model, pytest.mark.slow]
N_REQUESTS = int(os.environ.get("EDGE_LLM_SOAK_REQUESTS", "200"))
N_WARMUP, CONCURRENCY, CANCEL_RATE = 40, 8, 0.10
RSS_GROWTH_BOUND = 64 * 2**20
CACHE_RAM = 32 * 2**20  # evicted requests' KV states kept in host memory (--cache-ram)
MODEL = "soak"
WORDS = ("the a river stone light quick slow house garden winter code engine token model cloud paper "
         "music seven blue north apple window train bridge market story").split()
GREEDY = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path):
    tmp = tmp_path_factory.mktemp("soak")
    config = write_models_toml(tmp / "models.toml", {MODEL: demo_path}, n_ctx=2048)
    with ServerProcess(["--config", str(config), "-np", "4", "-t", "1", "--keep-alive", "-1", "--preload",
                        "--cache-ram", str(CACHE_RAM)],
                       tmp / "serve.log") as proc:
        yield proc.wait_healthy()


def plan(rng: random.Random, i: int) -> dict:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    cancel = rng.random() < CANCEL_RATE
    stream = cancel or rng.random() < 0.5
    chat = rng.random() < 0.5
    body = {"model": MODEL, "max_tokens": 200 if cancel else rng.randint(1, 16), "ignore_eos": True,
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": i, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "cancel": cancel}


async def run_one(client: httpx.AsyncClient, job: dict) -> dict:
    body = job["body"]
    if not body["stream"]:
        response = await client.post(job["path"], json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        return {"tokens": out["usage"]["completion_tokens"], "finish": out["choices"][0]["finish_reason"]}
    async with client.stream("POST", job["path"], json=body) as response:
        assert response.status_code == 200, await response.aread()
        usage, finish, done, content = None, None, False, 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                content += len(text)
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
            if job["cancel"] and content:
                return {"cancelled": True}  # leaving the block closes the connection mid-stream
        assert done, "the stream ended without [DONE]"
        return {"tokens": usage["completion_tokens"], "finish": finish}


async def run_all(url: str, jobs: list[dict]) -> list[dict]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def bounded(job):
            async with limit:
                return await run_one(client, job)

        return await asyncio.gather(*(bounded(job) for job in jobs))


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def settled(url: str, timeout: float = 30.0) -> str:
    """The metrics once nothing is running or waiting (cancellation reaches the engine asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        busy = [metric_value(text, f"edge_llm:num_requests_{kind}", model_name=MODEL) for kind in ("running", "waiting")]
        if busy == [0.0, 0.0] or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def finished_total(text: str) -> float:
    return sum(metric_value(text, "edge_llm:request_success_total", model_name=MODEL, finished_reason=reason) or 0.0
               for reason in ("stop", "length", "cancelled"))


@pytest.mark.timeout(1800)  # bounded by N_REQUESTS; generous because CI machines are slow and shared
def test_soak(server, record_property):
    rng = random.Random(1234)
    greedy_before = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    asyncio.run(run_all(server.url, [plan(rng, 100_000 + i) for i in range(N_WARMUP)]))
    before = settled(server.url)
    rss_before = server.rss_bytes()

    jobs = [plan(rng, i) for i in range(N_REQUESTS)]
    started = time.monotonic()
    results = asyncio.run(run_all(server.url, jobs))
    seconds = time.monotonic() - started

    after = settled(server.url)
    for kind in ("running", "waiting"):
        assert metric_value(after, f"edge_llm:num_requests_{kind}", model_name=MODEL) == 0, f"{kind} slots leaked"
    cancelled = sum(1 for job in jobs if job["cancel"])
    assert 0.05 * N_REQUESTS < cancelled < 0.15 * N_REQUESTS
    for job, result in zip(jobs, results, strict=True):
        if job["cancel"]:
            assert result == {"cancelled": True}
        else:
            assert result == {"tokens": job["body"]["max_tokens"], "finish": "length"}, job
    # Every request is accounted for, and each cancelled one was seen as cancelled by the server.
    assert finished_total(after) - finished_total(before) == N_REQUESTS
    cancelled_seen = (metric_value(after, "edge_llm:request_success_total", model_name=MODEL,
                                   finished_reason="cancelled") or 0.0) - \
                     (metric_value(before, "edge_llm:request_success_total", model_name=MODEL,
                                   finished_reason="cancelled") or 0.0)
    assert cancelled_seen == cancelled

    greedy_after = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    assert greedy_after == greedy_before
    growth = server.rss_bytes() - rss_before
    record_property("soak_seconds", round(seconds, 1))
    record_property("rss_growth_mib", round(growth / 2**20, 1))
    print(f"\nsoak: {N_REQUESTS} requests ({cancelled} cancelled) in {seconds:.1f} s; "
          f"RSS {rss_before / 2**20:.0f} MiB -> {(rss_before + growth) / 2**20:.0f} MiB ({growth / 2**20:+.1f} MiB)")
    cache_bytes = metric_value(after, "edge_llm:prompt_cache_bytes", model_name=MODEL, tier="ram")
    assert 0 < cache_bytes <= CACHE_RAM
    assert growth < RSS_GROWTH_BOUND + CACHE_RAM
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
