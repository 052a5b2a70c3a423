"""`edge-llm bench`: KV-cache sizes against llama.cpp's own accounting, and one small end-to-end run."""

from __future__ import annotations

import json

import pytest

from edge_llm.commands.bench import (
    Scenario,
    kv_bytes_per_element,
    kv_cache_bytes,
    markdown_table,
    parse_llama_log,
)
from edge_llm.errors import EdgeLLMError
from tests.conftest import run_cli

SMOLLM2 = {"general.architecture": "llama", "llama.block_count": "30", "llama.attention.head_count": "9",
           "llama.attention.head_count_kv": "3", "llama.embedding_length": "576"}


def test_kv_cache_bytes_from_the_model_shape():
    assert kv_bytes_per_element("f16") == 2 and kv_bytes_per_element("q8_0") == 34 / 32
    assert kv_bytes_per_element("q4_0") == 18 / 32
    # 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes x 512 cells
    assert kv_cache_bytes(SMOLLM2, 512, "f16", "f16") == 30 * 3 * 64 * 2 * 2 * 512
    assert kv_cache_bytes(SMOLLM2, 2048, "q8_0", "q4_0") == round(30 * 2048 * 192 * (34 / 32 + 18 / 32))
    with pytest.raises(EdgeLLMError):
        kv_bytes_per_element("q3_nonsense")


def test_parse_llama_log_takes_the_first_context():
    log = ("llama_kv_cache: size =   18.28 MiB (   256 cells,  30 layers,  8/8 seqs), K (q8_0): 11.95 MiB\n"
           "sched_reserve:        CPU compute buffer size =    98.25 MiB\n"
           "llama_kv_cache: size =    3.00 MiB (   64 cells ...\n")
    assert parse_llama_log(log) == {"kv_mib_llama": 18.28, "compute_buffer_mib": 98.25}


@pytest.mark.model  # rebuilds the bundled model as an HF checkpoint
@pytest.mark.slow
def test_an_hf_checkpoint_is_converted_to_f16_first(tmp_path, smollm2_hf_dir):
    from edge_llm.commands.bench import source_gguf
    from edge_llm.info import read_gguf_info

    path = source_gguf(str(smollm2_hf_dir), tmp_path / "work")  # the work folder does not exist yet
    assert read_gguf_info(path).file_type == "F16"


@pytest.mark.model
@pytest.mark.slow
def test_bench_command_end_to_end(demo_path, tmp_path):
    out = tmp_path / "out"
    matrix = tmp_path / "imatrix.gguf"
    r = run_cli("imatrix", str(demo_path), "-c", "64", "--chunks", "4", "-o", str(matrix))
    assert r.returncode == 0, r.stderr
    r = run_cli("bench", "-m", str(demo_path), "--quants", "q8_0,q4_0,q4_0+imatrix", "--imatrix", str(matrix),
                "--kv", "f16,q8_0", "-np", "2", "-c", "512", "--ppl-ctx", "64", "--chunks", "3", "--n-prompt", "32",
                "--n-gen", "12", "-o", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "bench.json").read_text())
    variants = {(v["quant"], v["kv"]): v for v in data["variants"]}
    assert list(variants) == [("q8_0", "f16"), ("q8_0", "q8_0"), ("q4_0", "f16"), ("q4_0", "q8_0"),
                              ("q4_0+imatrix", "f16"), ("q4_0+imatrix", "q8_0")]
    ref = variants[("q8_0", "f16")]
    assert ref["reference"] and ref["ppl_delta"] == 0 and ref["same_top"] == 1.0 and ref["mean_kld"] == 0
    assert variants[("q4_0", "f16")]["file_mib"] < ref["file_mib"]
    q4 = variants[("q4_0", "f16")]
    assert q4["mean_kld"] > 0 and q4["kld_p99"] > q4["mean_kld"] and q4["same_top"] < 1.0 and q4["ppl_delta"] != 0
    weighted = variants[("q4_0+imatrix", "f16")]
    assert weighted["file_mib"] == pytest.approx(q4["file_mib"], abs=0.5)  # + the quantize.imatrix.* keys
    assert weighted["mean_kld"] != q4["mean_kld"]
    assert not list(out.glob("variants/*.kld"))  # the reference's log-probs are removed after the run
    for v in variants.values():
        assert v["error"] is None
        (s,) = v["scenarios"]
        assert s["n_parallel"] == 2 and s["n_ctx"] == 512
        assert s["kv_mib"] == pytest.approx(s["kv_mib_llama"], abs=0.01)  # our arithmetic = llama.cpp's
        assert s["peak_rss_mib"] > s["rss_base_mib"] > 0
        assert s["prompt_tokens_per_s"] > 0 and s["gen_tokens_per_s"] > 0
    assert variants[("q8_0", "q8_0")]["scenarios"][0]["kv_mib"] < ref["scenarios"][0]["kv_mib"]
    table = (out / "bench.md").read_text()
    assert "| q8_0 (ref) | f16 |" in table and table.count("\n| q") == 6
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.split("\n", 2)[2].strip() in r.stdout  # the table is printed too


def test_markdown_table_marks_failed_variants():
    from edge_llm.commands.bench import VariantResult

    table = markdown_table([VariantResult("q2_k", "f16", "x.gguf", 50.0, error="worker failed (1): boom")],
                           [Scenario(1, 512)])
    assert "failed: worker failed" in table and "| q2_k | f16 | 50.0 |" in table


@pytest.mark.parametrize("results", ["bench-smollm2-demo.json", "bench-smollm2-converted.json"])
def test_no_label_of_the_chart_overlaps_another(results):
    """The charts of docs/benchmarks.md: every piece of text in either panel (tick labels, titles, legends) has
    room of its own (q4_k_m and q5_k_m, 7 MiB apart, once wrote their labels over each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_llm.commands.bench import chart_figure, load_results
    from tests.conftest import ROOT

    _, variants, scenarios = load_results(ROOT / "docs" / results)
    fig = chart_figure(variants, scenarios, "title")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        for axes in fig.axes:
            texts = [t for t in axes.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
            assert len(boxes) > 8
            for i, (a, box_a) in enumerate(boxes):
                for b, box_b in boxes[i + 1:]:
                    assert not box_a.overlaps(box_b), (a, b)
    finally:
        plt.close(fig)
