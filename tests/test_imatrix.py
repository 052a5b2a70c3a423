"""`edge-llm imatrix`, the KL-divergence statistics and the file formats they share with llama.cpp.

The fast tests restate llama-imatrix's and llama-perplexity's loops literally (tools/imatrix/
imatrix.cpp, tools/perplexity/perplexity.cpp) in plain Python and hold the vectorized code to them;
the slow ones run llama.cpp's own programs on the same model and text (tests/llama_cpp_tools.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from llama_cpp_tools import BUILD_TIMEOUT_S

from edge_llm.commands.kl_divergence import (
    BaseFile,
    KLDAccumulator,
    decode_rows,
    encode_rows,
    percentile,
    record_size,
)
from edge_llm.commands.perplexity import DEFAULT_CORPUS
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.imatrix import Collector, Entry, add_squares, plan, weight_name, write_imatrix
from edge_llm.quantize import load_imatrix, parse_tensor_type


def _rows(rng, n, ne0):
    """Activations with a wide range of magnitudes, so float32 rounding order shows."""
    return (rng.standard_normal((n, ne0)) * rng.uniform(1e-3, 1e3, size=(n, 1))).astype(np.float32)


def test_squares_are_added_row_after_row_in_float32():
    rng = np.random.default_rng(1)
    acc = rng.uniform(0, 10, size=96).astype(np.float32)
    rows = _rows(rng, 200, 96)
    expected = acc.copy()
    for row in rows:  # `acc[j] += x[j] * x[j]`
        expected = (expected + row * row).astype(np.float32)
    assert np.array_equal(add_squares(acc, rows), expected)
    assert not np.array_equal(acc + (rows.astype(np.float64) ** 2).sum(0).astype(np.float32), expected)


def _llama_dense(values, counts, x, w_ne2, w_ne3):
    """imatrix.cpp's MUL_MAT branch, loop for loop."""
    ne3, ne2, ne1, ne0 = x.shape
    for i3 in range(ne3):
        for i2 in range(ne2):
            mat = (i3 % w_ne3) * w_ne2 + (i2 % w_ne2)
            for row in range(ne1):
                for j in range(ne0):
                    values[mat * ne0 + j] = np.float32(values[mat * ne0 + j] + x[i3, i2, row, j] * x[i3, i2, row, j])
    counts[0] += ne1 * ne2 * ne3 // (w_ne2 * w_ne3)


def _llama_experts(values, counts, x, ids):
    """imatrix.cpp's MUL_MAT_ID branch: idx outer, row inner, row x[row, idx % ne1] to expert ids[row, idx]."""
    n_tokens, ne1, ne0 = x.shape
    for idx in range(ids.shape[1]):
        for row in range(n_tokens):
            ex = ids[row, idx]
            counts[ex] += 1
            for j in range(ne0):
                v = x[row, idx % ne1, j]
                values[ex * ne0 + j] = np.float32(values[ex * ne0 + j] + v * v)


def test_dense_and_expert_sums_equal_llama_imatrix_loops_bit_for_bit():
    rng = np.random.default_rng(2)
    c = Collector()
    # A 2D weight fed a (1, 2, 20, 8) input (rows of every slice go to the one matrix), twice.
    ref_v, ref_c = np.zeros(8, np.float32), np.zeros(1, np.int64)
    for _ in range(2):
        x = _rows(rng, 40, 8).reshape(1, 2, 20, 8)
        c.add_dense("blk.0.attn_q.weight", x, 1, 1)
        _llama_dense(ref_v, ref_c, x, 1, 1)
    assert np.array_equal(c.entries["blk.0.attn_q.weight"].values.reshape(-1), ref_v)
    assert c.entries["blk.0.attn_q.weight"].counts.tolist() == ref_c.tolist() == [80]
    # A 3D weight of 3 matrices, its input broadcast over 6 slices.
    ref_v, ref_c = np.zeros(3 * 8, np.float32), np.zeros(1, np.int64)
    x = _rows(rng, 6 * 17, 8).reshape(1, 6, 17, 8)
    c.add_dense("blk.0.w3", x, 3, 1)
    _llama_dense(ref_v, ref_c, x, 3, 1)
    assert np.array_equal(c.entries["blk.0.w3"].values.reshape(-1), ref_v)
    assert c.entries["blk.0.w3"].counts.tolist() == [34]
    # Experts: input rows shared by the used experts (ne1 = 1) and one row per used expert (ne1 = 2).
    for ne1, name in ((1, "blk.0.ffn_gate_exps.weight"), (2, "blk.0.ffn_down_exps.weight")):
        ref_v, ref_c = np.zeros(5 * 8, np.float32), np.zeros(5, np.int64)
        for _ in range(2):
            x = _rows(rng, 30 * ne1, 8).reshape(30, ne1, 8)
            ids = np.stack([rng.choice(4, size=2, replace=False) for _ in range(30)]).astype(np.int32)  # expert 4 idle
            c.add_experts(name, x, ids, 5)
            _llama_experts(ref_v, ref_c, x, ids)
        assert np.array_equal(c.entries[name].values.reshape(-1), ref_v)
        assert c.entries[name].counts.tolist() == ref_c.tolist() and ref_c[4] == 0
    with pytest.raises(EdgeLLMError, match="expert id outside"):
        c.add_experts("blk.1.ffn_up_exps.weight", _rows(rng, 4, 8).reshape(4, 1, 8), np.full((4, 2), 7, np.int32), 5)
    with pytest.raises(EdgeLLMError, match="non-finite"):
        c.add_dense("blk.2.x", np.full((1, 1, 16, 8), np.inf, np.float32), 1, 1)
    with pytest.raises(EdgeLLMError, match="inconsistent size"):
        c.add_dense("blk.0.attn_q.weight", _rows(rng, 16, 9).reshape(1, 1, 16, 9), 1, 1)


def test_snapshot_restore_drops_a_partial_chunk():
    rng = np.random.default_rng(3)
    c = Collector()
    c.add_dense("blk.0.a", _rows(rng, 16, 4).reshape(1, 1, 16, 4), 1, 1)
    saved = c.snapshot()
    before = c.entries["blk.0.a"].values.copy()
    c.add_dense("blk.0.a", _rows(rng, 16, 4).reshape(1, 1, 16, 4), 1, 1)
    c.add_dense("blk.0.b", _rows(rng, 16, 4).reshape(1, 1, 16, 4), 1, 1)
    c.restore(saved)
    assert list(c.entries) == ["blk.0.a"] and np.array_equal(c.entries["blk.0.a"].values, before)
    assert c.entries["blk.0.a"].counts.tolist() == [16]


def test_weight_names_and_the_chunk_plan():
    assert weight_name("CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert weight_name("blk.3.ffn_up.weight") == "blk.3.ffn_up.weight"
    assert plan(57084, 512, 512, None) == (111, 1)
    assert plan(57084, 512, 2048, 10) == (10, 4)  # llama-imatrix's default -b 2048: 4 chunks per decode
    assert plan(4096, 1024, 512, None) == (4, 1)  # -b below -c: several decodes per chunk
    with pytest.raises(InvalidParameterError, match="multiple"):
        plan(57084, 512, 1000, None)
    with pytest.raises(EdgeLLMError, match="needs at least 1024"):
        plan(1000, 512, 512, None)


def test_file_has_llama_imatrix_keys_and_quantize_reads_it(tmp_path):
    entries = {"blk.1.ffn_down.weight": Entry(np.array([[2.0, 4.0, 6.0]], np.float32), np.array([2])),
               "blk.0.ffn_down_exps.weight": Entry(np.array([[3.0, 6.0, 9.0], [1.0, 1.0, 1.0]], np.float32),
                                                   np.array([3, 0]))}
    path = write_imatrix(tmp_path / "m.gguf", entries, datasets=["text.txt"], chunk_count=5, chunk_size=512)
    reader = GGUFReader(path)
    keys = [name for name in reader.fields if not name.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["text.txt"]
    assert [t.name for t in reader.tensors] == [
        "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts",
        "blk.1.ffn_down.weight.in_sum2", "blk.1.ffn_down.weight.counts"]
    assert [list(t.shape) for t in reader.tensors] == [[3, 2], [1, 2], [3], [1]]  # ggml order, trailing ones dropped
    loaded = load_imatrix(path)
    assert loaded.datasets == ["text.txt"] and loaded.chunk_count == 5
    assert loaded.entries["blk.1.ffn_down.weight"].tolist() == [1.0, 2.0, 3.0]
    # sums / count per expert; an expert no token reached gets 1, as llama-quantize does.
    assert loaded.entries["blk.0.ffn_down_exps.weight"].tolist() == [1.0, 2.0, 3.0, 1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_tensor_type_overrides_are_checked():
    assert parse_tensor_type("FFN_Down=Q6_K") == ("ffn_down", 14)  # pattern lower-cased, as llama-quantize
    assert parse_tensor_type(r"blk\.[0-3]\.attn_v=q8_0") == (r"blk\.[0-3]\.attn_v", 8)
    for bad, fragment in (("ffn_down", "PATTERN=TYPE"), ("=q8_0", "PATTERN=TYPE"), ("x=q9_9", "unknown ggml type"),
                          ("blk.(=q8_0", "bad regular expression")):
        with pytest.raises(InvalidParameterError, match=fragment.replace("(", r"\(")):
            parse_tensor_type(bad)


# -- KL divergence -------------------------------------------------------------------------------


def _llama_record(logits):
    """perplexity.cpp's log_softmax(n_vocab, logits, uint16_t * log_prob, tok), element by element."""
    x = logits.astype(np.float32)
    mx, mn = np.float32(x.max()), np.float32(x.min())
    mn = max(mn, np.float32(mx - np.float32(16)))
    sum_exp = 0.0
    for v in x:
        sum_exp += float(np.exp(np.float32(v - mx)))
    lse = np.float32(np.log(sum_exp))
    rec = np.zeros(record_size(len(x)), np.uint16)
    rec[:4] = np.array([np.float32((mx - mn) / np.float32(65535)), np.float32(mn - mx - lse)], np.float32).view(np.uint16)
    inv = np.float32(1) / np.float32((mx - mn) / np.float32(65535))
    for i, v in enumerate(x):
        rec[4 + i] = int(np.rint(np.float32(inv * np.float32(v - mn)))) if v > mn else 0
    return rec


def test_base_records_are_llama_perplexitys():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 301)) * 4).astype(np.float32)  # an odd vocabulary: one padding value
    records = encode_rows(logits)
    assert records.shape == (3, 306)
    for row, rec in zip(logits, records, strict=True):
        assert np.array_equal(rec, _llama_record(row))
    exact = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    decoded = decode_rows(records, 301)
    kept = exact > exact.max(1, keepdims=True) - 16
    assert np.abs(decoded - exact)[kept].max() < 1e-3  # 16 nats in 65535 steps, plus float32


def test_kld_statistics_against_a_direct_computation():
    rng = np.random.default_rng(5)
    base = (rng.standard_normal((200, 500)) * 3).astype(np.float32)
    model = base + (rng.standard_normal((200, 500)) * 0.3).astype(np.float32)
    targets = rng.integers(0, 500, size=200)
    acc = KLDAccumulator()
    acc.add(model, encode_rows(base), targets)
    result = acc.result()
    p = np.exp(base - np.log(np.exp(base.astype(np.float64)).sum(1, keepdims=True)))
    log_q = model - np.log(np.exp(model.astype(np.float64)).sum(1, keepdims=True))
    kld = (p * (np.log(p) - log_q)).sum(1)
    assert result.count == 200
    assert result.mean_kld == pytest.approx(kld.mean(), rel=2e-3)
    assert result.kld_percentiles["99.0"] == pytest.approx(np.percentile(kld, 99), rel=2e-3)
    assert result.same_top == pytest.approx((model.argmax(1) == base.argmax(1)).mean())
    nll = -log_q[np.arange(200), targets]
    assert np.log(result.ppl) == pytest.approx(nll.mean(), rel=1e-5)
    same = KLDAccumulator()
    same.add(base, encode_rows(base), targets)
    assert abs(same.result().mean_kld) < 1e-4 and same.result().same_top == 1.0
    assert "Mean    KLD:" in result.report() and "99.0%   KLD:" in result.report()
    assert "Same top p:" in result.report()


def test_percentiles_as_llama_perplexity_takes_them():
    values = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    assert percentile(values, None) == 2.5 and percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile(values, 0.5) == pytest.approx(2.5) and percentile(values, 0.99) == pytest.approx(3.97)


# -- against llama.cpp's programs, on the bundled model ---------------------------------------------

CHUNK = 128  # small chunks keep these runs to seconds
# Weights in llama.cpp's extra CPU buffers (AMX tiles, repacked rows) run other kernels, whose sums
# differ in the last bits: both sides keep them out.
SAME_KERNELS = ("--no-repack",)
LLAMA_SAME_KERNELS = ("--no-repack",)


@pytest.fixture(scope="module")
def f16_and_text(demo_path, tmp_path_factory):
    """The bundled SmolLM2 rebuilt as f16 (its Q4_1 weights dequantized by llama.cpp), and a slice of
    the shipped calibration text."""
    from edge_llm.imatrix import DEFAULT_TEXT
    from edge_llm.quantize import quantize_file

    root = tmp_path_factory.mktemp("imatrix-ref")
    f16 = quantize_file(demo_path, root / "smollm2-f16.gguf", "f16", allow_requantize=True)
    text = root / "calibration.txt"
    text.write_text(DEFAULT_TEXT.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return f16, text


def _tensors(path):
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def _fields(path):
    return {f.name: f.contents() for f in GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.timeout(BUILD_TIMEOUT_S)  # may build llama.cpp's tools first
@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("batch", [CHUNK, 4 * CHUNK])  # one chunk per decode; four sequences per decode
def test_imatrix_equals_llama_imatrix(f16_and_text, tmp_path, batch):
    from llama_cpp_tools import run

    from tests.conftest import run_cli

    f16, text = f16_and_text
    common = ["-f", str(text), "-c", str(CHUNK), "-b", str(batch), "--chunks", "6", "-t", "2"]
    ours = run_cli("imatrix", str(f16), *common, *SAME_KERNELS, "-o", str(tmp_path / "ours.gguf"))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == str(tmp_path / "ours.gguf")
    assert "[6]" in ours.stderr and "210 weights over 6 chunks" in ours.stderr
    run("llama-imatrix", "-m", str(f16), *common, *LLAMA_SAME_KERNELS, "-o", str(tmp_path / "theirs.gguf"))
    assert _fields(tmp_path / "ours.gguf") == _fields(tmp_path / "theirs.gguf")
    mine, theirs = _tensors(tmp_path / "ours.gguf"), _tensors(tmp_path / "theirs.gguf")
    assert list(mine) == list(theirs) and len(mine) == 2 * 210  # 30 layers x 7 matrices, sums and counts
    for name, values in theirs.items():
        assert mine[name].shape == values.shape
        np.testing.assert_allclose(mine[name], values, rtol=1e-6, err_msg=name)
    # Same llama.cpp build, same row order: the same bits, so the same file.
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()


@pytest.mark.timeout(BUILD_TIMEOUT_S)  # may build llama.cpp's tools first
@pytest.mark.model
@pytest.mark.slow
def test_quant_from_our_imatrix_is_llama_quantizes_from_theirs(f16_and_text, tmp_path):
    """The same importance matrix file name, once holding llama-imatrix's file and once ours: llama-quantize
    with the first and edge-llm quantize with the second write the same bytes, with the per-tensor
    overrides too."""
    import shutil

    from llama_cpp_tools import run

    from edge_llm.quantize import quantize_file
    from tests.conftest import run_cli

    f16, text = f16_and_text
    common = ["-f", str(text), "-c", str(CHUNK), "-b", str(CHUNK), "--chunks", "6", "-t", "2"]
    run("llama-imatrix", "-m", str(f16), *common, *LLAMA_SAME_KERNELS, "-o", str(tmp_path / "llama-imatrix.gguf"))
    r = run_cli("imatrix", str(f16), *common, *SAME_KERNELS, "-o", str(tmp_path / "edge-llm-imatrix.gguf"))
    assert r.returncode == 0, r.stderr
    matrix = tmp_path / "imatrix.gguf"
    overrides = ["--tensor-type", "ffn_down=q6_k", "--tensor-type", r"blk\.1[0-9]\.attn_v=q8_0",
                 "--token-embedding-type", "q8_0"]
    for qtype, extra in (("q4_k_m", overrides), ("iq3_xxs", [])):
        shutil.copyfile(tmp_path / "llama-imatrix.gguf", matrix)
        run("llama-quantize", "--imatrix", str(matrix), *extra, str(f16), str(tmp_path / "theirs.gguf"),
            qtype.upper(), "2")
        shutil.copyfile(tmp_path / "edge-llm-imatrix.gguf", matrix)
        r = run_cli("quantize", str(f16), qtype, "--imatrix", str(matrix), *extra, "-o", str(tmp_path / "ours.gguf"),
                    "-t", "2")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes(), qtype
        meta = _fields(tmp_path / "ours.gguf")
        assert meta["quantize.imatrix.file"] == str(matrix) and meta["quantize.imatrix.chunks_count"] == 6
        assert meta["quantize.imatrix.dataset"] == str(text) and meta["quantize.imatrix.entries_count"] == 210
    plain = quantize_file(f16, tmp_path / "plain.gguf", "q4_k_m")
    assert plain.read_bytes() != (tmp_path / "ours.gguf").read_bytes()


@pytest.mark.timeout(BUILD_TIMEOUT_S)  # may build llama.cpp's tools first
@pytest.mark.model
@pytest.mark.slow
def test_kl_divergence_equals_llama_perplexity(f16_and_text, tmp_path):
    """llama-perplexity's base file read by edge-llm, and edge-llm's read by llama-perplexity: the mean
    KLD, its 99th percentile and the same-top share agree within 1%."""
    import re

    from llama_cpp_tools import run

    from edge_llm.quantize import quantize_file
    from tests.conftest import run_cli

    f16, _ = f16_and_text
    quant = quantize_file(f16, tmp_path / "q3.gguf", "q3_k_s")
    corpus = ["-c", str(CHUNK), "--chunks", "4", "-t", "2"]
    run("llama-perplexity", "-m", str(f16), "-f", str(DEFAULT_CORPUS), *corpus, "-b", str(CHUNK),
        *LLAMA_SAME_KERNELS, "--kl-divergence-base", str(tmp_path / "theirs.kld"))
    r = run_cli("perplexity", "-m", str(f16), "-f", str(DEFAULT_CORPUS), *corpus, *SAME_KERNELS,
                "--kl-divergence-base", str(tmp_path / "ours.kld"))
    assert r.returncode == 0, r.stderr
    theirs_base, ours_base = BaseFile.open(tmp_path / "theirs.kld"), BaseFile.open(tmp_path / "ours.kld")
    assert ours_base.tokens == theirs_base.tokens and ours_base.n_chunks == 4 and ours_base.n_vocab == 49152
    for chunk in (0, 3):
        assert np.abs(decode_rows(ours_base.chunk_records(chunk), 49152)
                      - decode_rows(theirs_base.chunk_records(chunk), 49152)).max() < 1e-3

    def llama_figures(text):
        grab = {"mean": r"Mean    KLD:\s+(-?[\d.]+)", "p99": r"99\.0%\s+KLD:\s+(-?[\d.]+)",
                "same": r"Same top p:\s+([\d.]+)"}
        return {k: float(re.search(p, text)[1]) for k, p in grab.items()}

    for base in ("theirs.kld", "ours.kld"):
        llama = run("llama-perplexity", "-m", str(quant), "-t", "2", "-b", str(CHUNK), *LLAMA_SAME_KERNELS,
                    "--kl-divergence-base", str(tmp_path / base), "--kl-divergence")
        mine = run_cli("perplexity", "-m", str(quant), "-t", "2", *SAME_KERNELS, "--kl-divergence-base",
                       str(tmp_path / base), "--kl-divergence")
        assert mine.returncode == 0, mine.stderr
        want, got = llama_figures(llama.stdout + llama.stderr), llama_figures(mine.stdout)
        assert want["mean"] > 0.005  # a real difference to measure
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=0.01), (base, key, got, want)


@pytest.mark.model
@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_chunks(f16_and_text, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    f16, _ = f16_and_text
    out = tmp_path / "partial.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "edge_llm", "imatrix", str(f16), "-c", str(CHUNK), "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = b""
    while b"[2]" not in seen:
        byte = proc.stderr.read(1)
        assert byte, seen.decode()
        seen += byte
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    stderr = seen.decode() + stderr.decode()
    assert proc.returncode == 0, stderr
    assert "stopping" in stderr and "(stopped early)" in stderr and "Traceback" not in stderr
    assert stdout.decode().strip() == str(out)
    meta = _fields(out)
    assert 2 <= meta["imatrix.chunk_count"] < 400
    counts = {name: float(v.reshape(-1)[0]) for name, v in _tensors(out).items() if name.endswith(".counts")}
    assert set(counts.values()) == {meta["imatrix.chunk_count"] * CHUNK}  # whole chunks only
    assert [p.name for p in tmp_path.iterdir()] == ["partial.gguf"]
