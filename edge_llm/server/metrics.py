"""/metrics in Prometheus' text format, named like vLLM's (`vllm:` becomes `edge_llm:`), one
series per served model (label `model_name`), so a vLLM dashboard works with a prefix change. The
gauges a router or autoscaler reads (running, waiting, KV-cache use) are also exported under vLLM's
own names, so an endpoint picker (Gateway API Inference Extension, llm-d) needs no setting.

Counters live in the server, not in the engines, so they keep counting across a model's unload
and reload; the running/waiting gauges are read from the loaded engines' `stats()` at scrape time.
Each app has its own CollectorRegistry, so two servers in one process (tests) do not mix counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge_llm.engines.base import EngineStats

if TYPE_CHECKING:
    from edge_llm.engines.base import Delta
    from edge_llm.server.access_log import RequestTokens
    from edge_llm.server.models import ModelManager

PREFIX = "edge_llm:"
VLLM_PREFIX = "vllm:"
# vLLM's buckets, trimmed: a laptop CPU is slower than a GPU, so the long tail matters more.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
LABEL = ["model_name"]


class ServerMetrics:
    def __init__(self, manager: ModelManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests", LABEL,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", LABEL, registry=r)
        self.prefix_cache_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache", LABEL, registry=r)
        self.prefix_cache_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         LABEL, registry=r)
        self.prefix_cache_hit_requests = Counter(PREFIX + "prefix_cache_hit_requests", "Requests that reused "
                                                 "a cached prompt prefix", LABEL, registry=r)
        self.prompt_cache_hits = Counter(PREFIX + "prompt_cache_hits", "Requests that resumed from a KV state saved "
                                         "in host memory or on disk (the prompt cache beyond the slots)", LABEL,
                                         registry=r)
        self.prompt_cache_restored_tokens = Counter(PREFIX + "prompt_cache_restored_tokens", "Prompt tokens "
                                                    "restored from the prompt cache instead of evaluated", LABEL,
                                                    registry=r)
        self.spec_decode_draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", "Drafted tokens verified "
                                                "by speculative decoding (--spec)", LABEL, registry=r)
        self.spec_decode_accepted_tokens = Counter(PREFIX + "spec_decode_num_accepted_tokens", "Drafted tokens "
                                                   "kept (each saves a decode)", LABEL, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                                       [*LABEL, "finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from request to first token",
                              LABEL, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time between two generated tokens",
                              LABEL, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from request to last token",
                             LABEL, buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineStateCollector(manager))

    def observer(self, model: str, tokens: RequestTokens | None = None) -> RequestObserver:
        return RequestObserver(self, model, tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """Timing and token counts of one request, fed delta by delta; the counts also go to the
    request's log line (`tokens`, access_log.py) when it has one."""

    def __init__(self, metrics: ServerMetrics, model: str, tokens: RequestTokens | None = None) -> None:
        self.metrics = metrics
        self.model = model
        self.tokens = tokens
        self.start = time.perf_counter()
        self._last_token: dict[int, float] = {}
        self._reasons: list[str] = []
        self._first = True
        self._done = False
        self._tpot = metrics.tpot.labels(model)  # looked up once: it is observed for every token

    def see(self, delta: Delta) -> None:
        now = time.perf_counter()
        m = self.metrics
        if delta.token_ids:
            if self._first:
                self._first = False
                m.ttft.labels(self.model).observe(now - self.start)
            elif delta.index in self._last_token:
                self._tpot.observe(now - self._last_token[delta.index])
            self._last_token[delta.index] = now
        if delta.finish_reason is not None:
            self._reasons.append(delta.finish_reason)
            usage = delta.usage
            if usage is not None:
                if self.tokens is not None:
                    self.tokens.add(usage.prompt_tokens if len(self._reasons) == 1 else 0, usage.completion_tokens)
                m.generation_tokens.labels(self.model).inc(usage.completion_tokens)
                m.spec_decode_draft_tokens.labels(self.model).inc(usage.draft_tokens)
                m.spec_decode_accepted_tokens.labels(self.model).inc(usage.accepted_tokens)
                if len(self._reasons) == 1:  # the n choices share one prompt
                    m.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
                    m.prefix_cache_queries.labels(self.model).inc(usage.prompt_tokens)
                    m.prefix_cache_hits.labels(self.model).inc(usage.cached_tokens)
                    if usage.cached_tokens:
                        m.prefix_cache_hit_requests.labels(self.model).inc()
                    if usage.restored_tokens:
                        m.prompt_cache_hits.labels(self.model).inc()
                        m.prompt_cache_restored_tokens.labels(self.model).inc(usage.restored_tokens)

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        reason = self._reasons[0] if self._reasons else "cancelled"
        if "cancelled" in self._reasons:
            reason = "cancelled"
        self.metrics.request_success.labels(self.model, reason).inc()
        self.metrics.e2e.labels(self.model).observe(time.perf_counter() - self.start)


class _EngineStateCollector:
    """Gauges read at scrape time from whatever is loaded now."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        running, running_vllm = _twice("num_requests_running", "Requests decoding in a slot")
        waiting, waiting_vllm = _twice("num_requests_waiting", "Requests queued for a slot")
        kv_usage, kv_usage_vllm = _twice("kv_cache_usage_perc", "Share of the KV cache held by running requests "
                                         "(0 to 1; what idle slots keep for returning conversations is free)")
        loaded = GaugeMetricFamily(PREFIX + "model_loaded", "1 if the model is in memory", labels=LABEL)
        slots = GaugeMetricFamily(PREFIX + "num_slots", "Parallel sequences (-np) of a loaded model", labels=LABEL)
        threads = GaugeMetricFamily(PREFIX + "cpu_threads", "Threads a decode uses now (fewer than the cores "
                                    "while other programs keep cores busy)", labels=LABEL)
        yielded = CounterMetricFamily(PREFIX + "decodes_with_fewer_threads", "Decodes run with fewer threads than "
                                      "cores because other programs kept cores busy", labels=LABEL)
        tier = [*LABEL, "tier"]
        held = GaugeMetricFamily(PREFIX + "prompt_cache_bytes", "Bytes of KV states held by the prompt cache",
                                 labels=tier)
        budget = GaugeMetricFamily(PREFIX + "prompt_cache_budget_bytes", "The prompt cache's byte budget (--cache-ram, "
                                   "--cache-disk)", labels=tier)
        evictions = CounterMetricFamily(PREFIX + "prompt_cache_evictions", "KV states dropped for the budget since "
                                        "the model was loaded", labels=tier)
        engines = self.manager.loaded()
        stats = {name: engine.stats() for name, engine in engines.items()}
        for name, figures in stats.items():
            for tier, cache in (("ram", figures.cache_ram), ("disk", figures.cache_disk)):
                if cache is not None:
                    held.add_metric([name, tier], float(cache.held_bytes))
                    budget.add_metric([name, tier], float(cache.budget_bytes))
                    evictions.add_metric([name, tier], float(cache.evictions))
        yield from (held, budget, evictions)
        idle = EngineStats()
        for name in self.manager.models:
            figures = stats.get(name)
            now = figures or idle
            loaded.add_metric([name], 1.0 if figures is not None else 0.0)
            for family in (running, running_vllm):
                family.add_metric([name], float(now.running))
            for family in (waiting, waiting_vllm):
                family.add_metric([name], float(now.waiting))
            for family in (kv_usage, kv_usage_vllm):
                family.add_metric([name], float(now.kv_usage))
            if figures is not None:
                slots.add_metric([name], float(figures.slots))
            if now.threads is not None:
                threads.add_metric([name], float(now.threads))
                yielded.add_metric([name], float(now.decodes_with_fewer_threads))
        yield from (running, waiting, kv_usage, loaded, slots, threads, yielded)
        yield from (running_vllm, waiting_vllm, kv_usage_vllm)


def _twice(name: str, documentation: str) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """A gauge under edge-llm's name and under vLLM's own (`vllm:`), so the endpoint pickers,
    autoscalers and dashboards written for vLLM read edge-llm unchanged (deploy/kubernetes/)."""
    return (GaugeMetricFamily(PREFIX + name, documentation, labels=LABEL),
            GaugeMetricFamily(VLLM_PREFIX + name, documentation + " (vLLM's name)", labels=LABEL))
