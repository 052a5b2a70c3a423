"""scripts/bench_serving.py's bookkeeping: medians per case, ratios to llama-server of the same
case, the issue's targets, on made-up rows (the script itself needs servers and minutes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_serving  # noqa: E402


def row(server, clients, tokens_per_s, ttft_p95=0.5, *, model="m", scenario="quiet", sampling="greedy", rnd=0):
    return {"model": model, "scenario": scenario, "sampling": sampling, "server": server, "clients": clients,
            "round": rnd, "tokens_per_s": tokens_per_s, "ttft_p50": ttft_p95 / 2, "ttft_p95": ttft_p95,
            "server_cpu_cores": 1.0, "cpu_ms_per_token": 1000 / tokens_per_s, "idle_cpu_cores_after": 0.0}


def test_medians_and_ratios_are_per_model_scenario_sampling_and_level():
    raw = [row("edge-llm", 1, 100, rnd=0), row("edge-llm", 1, 120, rnd=1), row("edge-llm", 1, 80, rnd=2),
           row("llama-server", 1, 50), row("edge-llm", 1, 10, sampling="sampled"),
           row("llama-server", 1, 20, sampling="sampled"), row("edge-llm", 1, 30, model="other")]
    rows = bench_serving.summarize(raw)
    edge = next(r for r in rows if (r["model"], r["sampling"], r["server"]) == ("m", "greedy", "edge-llm"))
    assert edge["tokens_per_s"] == 100 and edge["rounds"] == 3 and edge["tokens_ratio"] == 2.0
    sampled = next(r for r in rows if (r["sampling"], r["server"]) == ("sampled", "edge-llm"))
    assert sampled["tokens_ratio"] == 0.5
    assert "tokens_ratio" not in next(r for r in rows if r["model"] == "other")  # no anchor to compare with


def test_targets_quiet_contended_and_ttft_at_the_highest_level():
    raw = [row("edge-llm", 1, 100), row("llama-server", 1, 100),
           row("edge-llm", 8, 300, ttft_p95=1.2), row("llama-server", 8, 250, ttft_p95=1.0),
           row("edge-llm", 1, 140, scenario="contended"), row("llama-server", 1, 100, scenario="contended")]
    verdicts = {(t["scenario"], t["clients"]): t for t in bench_serving.targets(bench_serving.summarize(raw), "edge-llm")}
    assert verdicts[("quiet", 1)]["met"] and verdicts[("quiet", 1)]["max_ttft_p95_ratio"] is None
    assert not verdicts[("quiet", 8)]["met"]  # 1.2x tokens/s, but TTFT p95 1.2x > 1.0
    assert verdicts[("quiet", 8)]["max_ttft_p95_ratio"] == 1.0
    assert not verdicts[("contended", 1)]["met"]  # 1.4x < 1.5x


def test_prefill_ratios_alone_and_beside_streams():
    raw = [{"model": "m", "scenario": "quiet", "server": s, "round": 0, "prompt_tokens": 512, "beside": b,
            "ttft": t, "prefill_tokens_per_s": 512 / t, "beside_events_per_s": 10.0 if b else None}
           for s, b, t in [("edge-llm", 0, 1.0), ("llama-server", 0, 2.0), ("edge-llm", 2, 4.0), ("llama-server", 2, 2.0)]]
    rows = {(r["server"], r["beside"]): r for r in bench_serving.summarize_prefill(raw)}
    assert rows[("edge-llm", 0)]["prefill_ratio"] == 2.0
    assert rows[("edge-llm", 2)]["prefill_ratio"] == 0.5
    assert rows[("edge-llm", 2)]["beside_events_per_s"] == 10.0
