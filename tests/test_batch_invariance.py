"""Greedy output that does not depend on the batch a token is decoded in, on two model families.

Speculation verifies drafted tokens in one batch, and other requests' tokens share each step's
batch; greedy output is the same as decoding alone only if a token's logits do not depend on the
rows decoded with it. llama.cpp's CPU matmuls give bit-identical rows at any batch size for most
weight types, but not x86's repacked q4_K layout (CPU_REPACK: rows four at a time in a GEMM, the
rest in a GEMV, rounded differently), which every q4_k_m file uses. So the guarantee tested here:
Gemma 3 at q8_0 with the defaults, and Llama at q4_k_m with -nr (--no-repack), give the same
logits alone and in a batch, and the same greedy output with speculation, alone or beside other
requests, as without it. (Without -nr a q4_k_m model's logits differ in the last bits from batch
to batch, and a near tie can flip: docs/design.md, speculative decoding.)
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from tiny_models import build_gemma, build_llama, train_gemma_tokenizer, train_sentencepiece

from edge_llm.engines.base import collect
from edge_llm.engines.speculation import StepCost
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, 12345 times", "def square(x): return"]
GREEDY = SamplingParams.create(temperature=0, max_tokens=48, ignore_eos=True)


class OracleDrafter:
    """Drafts what decoding without speculation produced, every third drafted token made wrong: the
    verification batches then hold kept and rejected drafts, whatever a random model writes."""

    costly = False

    def __init__(self, sequences: list[list[int]], n_vocab: int) -> None:
        self.sequences = sequences
        self.n_vocab = n_vocab

    def propose(self, wanted: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        out = {}
        for seq_id, (tokens, n) in wanted.items():
            full = next((s for s in self.sequences if s[:len(tokens)] == tokens), [])
            draft = full[len(tokens):len(tokens) + n]
            out[seq_id] = [(t + 1) % self.n_vocab if i % 3 == 2 else t for i, t in enumerate(draft)]
        return out

    def close(self) -> None:
        pass


class FreeVerification(StepCost):
    """Every run costs the same, so the plan drafts wherever the lookup finds a draft."""

    def run(self, n_tokens: int) -> float:
        return 1.0


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (GGUF, load options under which the guarantee holds)."""
    from edge_llm.convert import convert

    root = tmp_path_factory.mktemp("batch-invariance")
    gemma = build_gemma(root / "gemma3", train_gemma_tokenizer(root / "gemma-tokenizer"), version=3)
    # Rows of 256 so that llama.cpp can use q4_K (and its repacked layout) for the attention weights.
    llama = build_llama(root / "llama", train_sentencepiece(root / "spm"), hidden_size=256, intermediate_size=512)
    return {"gemma3-q8_0": (convert(gemma.path, root / "gemma3-q8_0.gguf", quant="q8_0"), {}),
            "llama-q4_k_m-no-repack": (convert(llama.path, root / "llama-q4_k_m.gguf", quant="q4_k_m"),
                                       {"repack": False})}


def load_engine(path: Path, options: dict, spec: str):
    from edge_llm.api import load

    engine = load(str(path), n_ctx=4 * 512, n_parallel=4, n_threads=2, adapt_threads=False, spec=spec, **options)
    engine.scheduler.cost = FreeVerification()
    return engine


def test_the_q4_k_m_file_has_q4_k_weights(families):
    from gguf import GGMLQuantizationType, GGUFReader

    path, _ = families["llama-q4_k_m-no-repack"]
    assert GGMLQuantizationType.Q4_K in {t.tensor_type for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", ["gemma3-q8_0", "llama-q4_k_m-no-repack"])
def test_logits_alone_equal_logits_in_a_batch(families, family):
    from edge_llm.engines import llama_runtime as rt

    path, options = families[family]
    engine = load_engine(path, options, spec="off")
    ctx = engine.new_context(rt.context_params(n_ctx=256, n_batch=64, n_seq_max=1, n_threads=2),
                             what="a test context")
    try:
        n_vocab = engine.n_vocab
        memory, batch = rt.SequenceMemory(ctx), rt.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1)
        rng = np.random.default_rng(0)
        prompt, tokens = [int(t) for t in rng.integers(3, n_vocab, 20)], [int(t) for t in rng.integers(3, n_vocab, 6)]

        def decode(ids: list[int], pos: int) -> list[np.ndarray]:
            batch.reset()
            rt.add_tokens(batch, ids, pos=pos, seq_id=0, logits=lambda i: True)
            rt.decode(ctx, batch)
            return [rt.logits(ctx, i, n_vocab).copy() for i in range(len(ids))]

        memory.clear(0)
        decode(prompt, 0)
        alone = [decode([t], len(prompt) + i)[0] for i, t in enumerate(tokens)]
        memory.cut(0, len(prompt))
        together = decode(tokens, len(prompt))
        memory.clear(0)
        for one, many in zip(alone, together, strict=True):
            assert np.array_equal(one, many)
        batch.close()
    finally:
        ctx.close()
        engine.close()


@pytest.mark.parametrize("family", ["gemma3-q8_0", "llama-q4_k_m-no-repack"])
def test_greedy_output_is_the_same_with_speculation_alone_and_beside_others(families, family):
    path, options = families[family]
    plain, speculative = load_engine(path, options, "off"), load_engine(path, options, "ngram")
    try:
        prompts = [plain.tokenize(p) for p in PROMPTS]
        expected = [collect(plain.stream(p, GREEDY))[0].token_ids for p in prompts]
        speculative.scheduler.drafter = OracleDrafter([p + e for p, e in zip(prompts, expected, strict=True)],
                                                      speculative.n_vocab)
        stats = speculative.scheduler.stats
        assert [collect(speculative.stream(p, GREEDY))[0].token_ids for p in prompts] == expected
        assert stats.accepted_tokens > 20 and stats.draft_tokens - stats.accepted_tokens > 5
        results: list = [None] * len(PROMPTS)

        def run(i: int) -> None:
            results[i] = collect(speculative.stream(prompts[i], GREEDY))[0].token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert results == expected
    finally:
        plain.close()
        speculative.close()
