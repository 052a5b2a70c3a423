"""scripts/bench_spec.py's bookkeeping: medians, ratios, the issue's targets and the table, on
made-up measurements (no server, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_spec  # noqa: E402
from bench_servers import parse_metrics, turn_order  # noqa: E402


def run(server: str, task: str, clients: int, tokens_per_s: float, rnd: int = 0, **extra) -> dict:
    return {"server": server, "task": task, "clients": clients, "round": rnd, "tokens_per_s": tokens_per_s,
            "ttft_p50": 0.1, "decode_p50": tokens_per_s * 2, "outputs": ["a", "b"], **extra}


def test_summarize_takes_the_median_over_rounds_and_divides_by_each_baseline():
    raw = [run("edge-llm-spec", "copy", 1, v, rnd=i) for i, v in enumerate((150.0, 10.0, 160.0))]
    raw += [run("edge-llm-off", "copy", 1, 100.0), run("llama-server-lookup", "copy", 1, 120.0)]
    rows = bench_spec.summarize(raw)
    spec = bench_spec.find(rows, "copy", 1, "edge-llm-spec")
    assert spec["tokens_per_s"] == 150.0 and spec["rounds"] == 3
    assert spec["ratios"] == {"edge-llm-off": 1.5, "llama-server-lookup": 1.25}  # llama-server-off did not run


def test_rows_come_copy_first_then_by_clients():
    raw = [run("edge-llm-off", "open", 4, 1.0), run("edge-llm-off", "open", 1, 1.0), run("edge-llm-off", "copy", 4, 1.0)]
    assert [(r["task"], r["clients"]) for r in bench_spec.summarize(raw)] == [("copy", 4), ("open", 1), ("open", 4)]


def test_targets_use_edge_llm_off_and_say_met_or_missed():
    raw = [run("edge-llm-spec", "copy", 1, 149.0), run("edge-llm-off", "copy", 1, 100.0),
           run("edge-llm-spec", "open", 4, 97.0), run("edge-llm-off", "open", 4, 100.0),
           run("edge-llm-spec", "open", 1, 50.0)]  # no baseline for this case: no verdict
    verdicts = {(t["task"], t["clients"]): t for t in bench_spec.targets(bench_spec.summarize(raw))}
    assert set(verdicts) == {("copy", 1), ("open", 4)}
    assert verdicts["copy", 1]["met"] is False and verdicts["copy", 1]["min_ratio"] == 1.5
    assert verdicts["open", 4]["met"] is True and verdicts["open", 4]["ratio"] == 0.97


def test_against_strongest_picks_the_fastest_other_server_of_the_same_case():
    raw = [run("edge-llm-spec", "copy", 1, 90.0), run("edge-llm-off", "copy", 1, 60.0),
           run("llama-server-lookup", "copy", 1, 100.0), run("llama-server-off", "copy", 4, 500.0)]
    (item,) = bench_spec.against_strongest(bench_spec.summarize(raw))
    assert item == {"task": "copy", "clients": 1, "strongest": "llama-server-lookup", "ratio": 0.9}


def test_markdown_has_one_row_per_case_and_dashes_for_missing_baselines():
    raw = [run("edge-llm-spec", "copy", 1, 150.0, fidelity=0.98,
               spec_metrics={"edge_llm:spec_draft_tokens_total": 40.0, "edge_llm:spec_draft_accepted_total": 30.0}),
           run("edge-llm-off", "copy", 1, 100.0, fidelity=0.97),
           run("llama-server-lookup", "copy", 1, 120.0, fidelity=0.99, llama_draft_n=50, llama_draft_accepted=45)]
    lines = bench_spec.markdown(bench_spec.summarize(raw)).splitlines()
    assert len(lines) == 2 + 3
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    spec_line = next(line for line in lines if "| edge-llm-spec |" in line)
    assert "| 150.0 | 1.50 | 1.25 | - |" in spec_line and "| 0.98 |" in spec_line and "| 30 / 40 |" in spec_line
    assert "| 45 / 50 |" in next(line for line in lines if "| llama-server-lookup |" in line)


def test_same_outputs_compares_request_by_request_within_a_round():
    raw = [run("edge-llm-spec", "copy", 1, 1.0, rnd=0, outputs=["a", "x"]),
           run("edge-llm-spec", "copy", 1, 1.0, rnd=1, outputs=["a", "b"]),
           run("edge-llm-spec", "copy", 1, 1.0, rnd=2, outputs=["a", "b"]),  # no baseline run in round 2
           run("edge-llm-off", "copy", 1, 1.0, rnd=0, outputs=["a", "b"]),
           run("edge-llm-off", "copy", 1, 1.0, rnd=1, outputs=["a", "b"])]
    rows = bench_spec.summarize(raw)
    assert bench_spec.find(rows, "copy", 1, "edge-llm-spec")["same_outputs"] == (3, 4)
    assert "same_outputs" not in bench_spec.find(rows, "copy", 1, "edge-llm-off")
    assert "| 3 / 4 |" in bench_spec.markdown(rows)


def test_copy_fidelity_is_one_for_a_verbatim_prefix_and_drops_with_drift():
    passage = bench_spec.PASSAGES[0]
    prefix = " ".join(passage.split()[:60])
    assert bench_spec.copy_fidelity(prefix, passage) == 1.0
    drifted = " ".join(passage.split()[:30] + ["something", "else", "entirely"] * 10)
    assert bench_spec.copy_fidelity(drifted, passage) < 0.7


def test_task_messages_cycle_through_passages_and_topics():
    first, again = bench_spec.task_messages("copy", 0), bench_spec.task_messages("copy", len(bench_spec.PASSAGES))
    assert first == again and bench_spec.PASSAGES[0] in first[-1]["content"]
    assert bench_spec.task_messages("open", 1) != bench_spec.task_messages("open", 2)
    with pytest.raises(ValueError):
        bench_spec.task_messages("summarise", 0)


def test_parse_checkout_and_variant():
    name, path, args = bench_spec.parse_checkout("old=/tmp/wt:--spec ngram --draft-max 8")
    assert (name, path, args) == ("old", Path("/tmp/wt"), ("--spec", "ngram", "--draft-max", "8"))
    assert bench_spec.parse_checkout("old=/tmp/wt")[2] == ()
    assert bench_spec.parse_variant("mapk:--spec-type ngram-map-k") == ("mapk", ("--spec-type", "ngram-map-k"))


def test_parse_metrics_keeps_samples_and_skips_comments():
    text = ("# HELP edge_llm:spec_draft_tokens_total drafted\n# TYPE edge_llm:spec_draft_tokens_total counter\n"
            "edge_llm:spec_draft_tokens_total 12\nedge_llm:requests{route=\"chat\"} 3.5\nnot a sample\n")
    assert parse_metrics(text) == {"edge_llm:spec_draft_tokens_total": 12.0, 'edge_llm:requests{route="chat"}': 3.5}


def test_turn_order_rotates_by_round():
    assert turn_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert turn_order(["a", "b", "c"], 4) == ["b", "c", "a"]
