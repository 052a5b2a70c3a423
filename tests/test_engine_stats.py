"""/metrics reads an engine only through Engine.stats() (EngineStats): no model needed."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edge_llm.engines.base import CacheTierStats, EngineStats
from edge_llm.server.metrics import ServerMetrics
from tests.fake_engine import FakeEngine


class Manager:
    def __init__(self, engines: dict, models: list[str]) -> None:
        self.engines, self.models = engines, models

    def loaded(self) -> dict:
        return dict(self.engines)


class Busy(FakeEngine):
    def stats(self) -> EngineStats:
        return EngineStats(slots=8, running=3, waiting=2, kv_usage=0.25, threads=2, decodes_with_fewer_threads=5,
                           cache_ram=CacheTierStats(100, 1000, 1), cache_disk=CacheTierStats(200, 2000, 4))


def scrape(manager: Manager) -> dict[tuple[str, tuple], float]:
    text = ServerMetrics(manager).render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_what_engine_stats_report():
    values = scrape(Manager({"busy": Busy()}, ["busy", "gone"]))
    busy, gone = (("model_name", "busy"),), (("model_name", "gone"),)
    assert values["edge_llm:num_requests_running", busy] == 3
    assert values["vllm:num_requests_running", busy] == 3
    assert values["edge_llm:num_requests_waiting", busy] == 2
    assert values["edge_llm:kv_cache_usage_perc", busy] == 0.25
    assert values["edge_llm:num_slots", busy] == 8
    assert values["edge_llm:cpu_threads", busy] == 2
    assert values["edge_llm:decodes_with_fewer_threads_total", busy] == 5
    assert values["edge_llm:prompt_cache_bytes", (("model_name", "busy"), ("tier", "disk"))] == 200
    assert values["edge_llm:prompt_cache_budget_bytes", (("model_name", "busy"), ("tier", "ram"))] == 1000
    assert values["edge_llm:prompt_cache_evictions_total", (("model_name", "busy"), ("tier", "disk"))] == 4
    assert values["edge_llm:model_loaded", busy] == 1 and values["edge_llm:model_loaded", gone] == 0
    assert values["edge_llm:num_requests_running", gone] == 0
    assert ("edge_llm:num_slots", gone) not in values


def test_an_engine_without_a_scheduler_reports_its_slots_and_nothing_running():
    assert FakeEngine(n_parallel=4).stats() == EngineStats(slots=4)
    values = scrape(Manager({"fake": FakeEngine(n_parallel=4)}, ["fake"]))
    assert values["edge_llm:num_slots", (("model_name", "fake"),)] == 4
    assert not any(name.startswith(("edge_llm:cpu_threads", "edge_llm:prompt_cache")) for name, _ in values)
