"""`edge-llm perplexity`: llama-perplexity's chunking rule, checked against an independent
evaluation through llama-cpp-python's high-level `Llama` (its own context, batch and logits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_llm.errors import EdgeLLMError
from edge_llm.perplexity import (
    DEFAULT_CORPUS,
    TopKReference,
    compute_perplexity,
    kl_top_k,
    log_softmax,
    plan_chunks,
    top_k,
)
from tests.conftest import run_cli

N_CTX = 128
CHUNKS = 3


def test_shipped_corpus_is_small_public_domain_text():
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    assert 20_000 < len(text.encode()) < 1_000_000
    assert text.startswith("The First Book of Moses, called Genesis")


def test_chunk_plan_follows_llama_perplexity():
    plan = plan_chunks(n_tokens=11454, n_ctx=512)
    assert plan.n_chunks == 22  # n_tokens / n_ctx, the tail dropped
    assert plan.first == 256 and plan.scored_per_chunk == 255  # positions 256..510 predict 257..511
    assert plan.n_scored == 22 * 255
    assert plan_chunks(11454, 512, max_chunks=4).n_chunks == 4
    with pytest.raises(EdgeLLMError, match="needs at least 1024"):
        plan_chunks(1023, 512)


def test_kl_over_top_k_is_zero_for_the_same_distribution_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(0)
    p = log_softmax(rng.normal(size=(5, 300)) * 6)  # peaked, as next-token distributions are
    q = log_softmax(np.log(np.exp(p) + 0.002))  # a perturbed distribution
    ids, lp = top_k(p, 50)
    assert np.all(np.diff(lp, axis=1) <= 0)  # best first
    assert np.allclose(kl_top_k(ids, lp, p), 0.0, atol=1e-6)
    full = (np.exp(p) * (p - q)).sum(axis=1)
    approx = kl_top_k(ids, lp, q)
    assert np.all(approx <= full + 1e-9) and np.all(approx > 0.95 * full)


@pytest.fixture(scope="module")
def ppl_run(engine):
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    # Flash attention changes the numbers slightly (about 0.5% here): fix it on both sides.
    return compute_perplexity(engine, text, n_ctx=N_CTX, max_chunks=CHUNKS, save_top_k=16, flash_attn="off")


@pytest.mark.model
def test_perplexity_is_finite_and_reproducible(engine, ppl_run):
    result, saved = ppl_run
    assert math.isfinite(result.ppl) and 1.0 < result.ppl < 1000.0
    assert result.n_chunks == CHUNKS and result.n_scored == CHUNKS * (N_CTX - N_CTX // 2 - 1)
    assert len(result.running) == CHUNKS and result.running[-1] == result.ppl
    # Same model, same text: the same number again, and agreement with itself is total.
    again, _ = compute_perplexity(engine, DEFAULT_CORPUS.read_text(encoding="utf-8"), n_ctx=N_CTX,
                                  max_chunks=CHUNKS, reference=saved, flash_attn="off")
    assert again.ppl == pytest.approx(result.ppl, rel=1e-6)
    assert again.top1_agreement == 1.0 and again.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert saved.ids.shape == (result.n_scored, 16)


@pytest.mark.model
def test_perplexity_matches_an_independent_llama_perplexity_computation(demo_path, ppl_run):
    """Restate llama-perplexity's rule here (n_chunk = n_tokens / n_ctx; BOS first if the model adds
    it; score positions n_ctx/2 .. n_ctx-2 against the next token) and evaluate every chunk with
    llama-cpp-python's high-level Llama and its `scores`, a separate code path."""
    from tiny_models import reference_llama

    result, _ = ppl_run
    llm = reference_llama(demo_path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False, flash_attn=False)
    try:
        add_bos = llm._model.add_bos_token()
        tokens = llm.tokenize(DEFAULT_CORPUS.read_bytes(), add_bos=add_bos, special=False)
        assert len(tokens) == result.n_tokens
        n_chunk = min(len(tokens) // N_CTX, CHUNKS)
        first = N_CTX // 2
        nll, count, running = 0.0, 0, []
        for i in range(n_chunk):
            chunk = tokens[i * N_CTX:(i + 1) * N_CTX]
            if add_bos:
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[:N_CTX], dtype=np.float64)
            for j in range(first, N_CTX - 1):
                row = logits[j] - logits[j].max()
                nll += -(row[chunk[j + 1]] - math.log(np.exp(row).sum()))
                count += 1
            running.append(math.exp(nll / count))
    finally:
        llm.close()
    assert count == result.n_scored
    assert result.running == pytest.approx(running, rel=1e-9)


@pytest.mark.model
def test_perplexity_command(demo_path, tmp_path):
    ref = tmp_path / "ref.npz"
    r = run_cli("perplexity", "-m", str(demo_path), "-c", "64", "--chunks", "2", "--json", "--save-reference",
                str(ref), "--top-k", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_chunks"] == 2 and math.isfinite(out["ppl"])
    assert "[1]" in r.stderr and "[2]" in r.stderr  # running values, as llama-perplexity prints them
    assert TopKReference.load(ref).ids.shape == (2 * 31, 8)
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.", encoding="utf-8")
    r = run_cli("perplexity", "-m", str(demo_path), "-f", str(short), "-c", "64")
    assert r.returncode == 1 and "needs at least 128" in r.stderr and "Traceback" not in r.stderr
