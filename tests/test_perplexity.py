"""`edge-llm perplexity`: llama-perplexity's chunking rule, checked against an independent
evaluation through llama-cpp-python's high-level `Llama` (its own context, batch and logits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_llm.commands.kl_divergence import BaseFile
from edge_llm.commands.perplexity import DEFAULT_CORPUS, compute_perplexity, plan_chunks
from edge_llm.errors import EdgeLLMError
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


@pytest.fixture(scope="module")
def ppl_run(engine, tmp_path_factory):
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    base = tmp_path_factory.mktemp("ppl") / "base.kld"
    # Flash attention changes the numbers slightly (about 0.5% here): fix it on both sides.
    result = compute_perplexity(engine, text, n_ctx=N_CTX, max_chunks=CHUNKS, save_base=base, flash_attn="off")
    return result, base


@pytest.mark.model
def test_perplexity_is_finite_and_reproducible(engine, ppl_run):
    result, base = ppl_run
    assert math.isfinite(result.ppl) and 1.0 < result.ppl < 1000.0
    assert result.n_chunks == CHUNKS and result.n_scored == CHUNKS * (N_CTX - N_CTX // 2 - 1)
    assert len(result.running) == CHUNKS and result.running[-1] == result.ppl
    # Same model, its own base file: the same perplexity, no divergence, the same top token everywhere.
    again = compute_perplexity(engine, None, kld_base=BaseFile.open(base), flash_attn="off")
    assert again.ppl == pytest.approx(result.ppl, rel=1e-6) and again.n_scored == result.n_scored
    assert again.kld.same_top == 1.0 and abs(again.kld.mean_kld) < 1e-4
    assert again.kld.ppl_base == pytest.approx(result.ppl, rel=1e-3)  # the base file's own log-probs, 16-bit
    opened = BaseFile.open(base)
    assert (opened.n_ctx, opened.n_chunks, opened.n_vocab) == (N_CTX, CHUNKS, engine.n_vocab)


@pytest.mark.model
def test_perplexity_matches_an_independent_llama_perplexity_computation(demo_path, ppl_run):
    """Restate llama-perplexity's rule here (n_chunk = n_tokens / n_ctx; BOS first if the model adds
    it; score positions n_ctx/2 .. n_ctx-2 against the next token) and evaluate every chunk with
    llama-cpp-python's high-level Llama and its `scores`, a separate code path."""
    from reference_llama import reference_llama

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
    base = tmp_path / "base.kld"
    r = run_cli("perplexity", "-m", str(demo_path), "-c", "64", "--chunks", "2", "--json", "--kl-divergence-base",
                str(base))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_chunks"] == 2 and math.isfinite(out["ppl"]) and out["kld"] is None
    assert "[1]" in r.stderr and "[2]" in r.stderr  # running values, as llama-perplexity prints them
    # 20-byte header, 2 x 64 tokens, 2 x 31 scored positions of (4 + 49152) uint16
    assert base.stat().st_size == 20 + 4 * 128 + 2 * 31 * 49156 * 2
    r = run_cli("perplexity", "-m", str(demo_path), "--kl-divergence-base", str(base), "--kl-divergence")
    assert r.returncode == 0, r.stderr
    assert "Same top p: 100.000" in r.stdout and "Mean    KLD:" in r.stdout
    assert "KL Divergence" in r.stderr  # llama-perplexity's table per chunk
    for args, fragment in ((["--kl-divergence"], "needs --kl-divergence-base"),
                           (["--kl-divergence-base", str(base), "--kl-divergence", "-c", "128"], "computed with -c 64"),
                           (["--kl-divergence-base", str(demo_path), "--kl-divergence"], "not a KL-divergence base")):
        r = run_cli("perplexity", "-m", str(demo_path), *args)
        assert r.returncode == 1 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.", encoding="utf-8")
    r = run_cli("perplexity", "-m", str(demo_path), "-f", str(short), "-c", "64")
    assert r.returncode == 1 and "needs at least 128" in r.stderr and "Traceback" not in r.stderr
