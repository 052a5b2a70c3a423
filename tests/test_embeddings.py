"""Embedding models and rerankers, end to end on tiny random checkpoints of each family
(tests/tiny_embedding_models.py): the converter against llama.cpp's, the engine's vectors and scores
against sentence-transformers (transformers for Qwen3-Reranker), and the server's against
llama-server's on the same GGUF."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from llama_cpp_reference import gguf_differences, reference_gguf
from tiny_embedding_models import EMBEDDING_FAMILIES, QUERY, TEXTS, build_encoder_tokenizers

from edge_llm.convert import convert
from edge_llm.engines.base import load_engine
from edge_llm.model_kind import model_kind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def encoder_tokenizers(tmp_path_factory, demo_path):
    return build_encoder_tokenizers(tmp_path_factory.mktemp("encoder-tokenizers"), demo_path)


@pytest.fixture(scope="session")
def tiny_encoder(encoder_tokenizers, tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = EMBEDDING_FAMILIES[name].build(tmp_path_factory.mktemp(name) / name, encoder_tokenizers)
        return built[name]

    return get


@pytest.fixture(scope="session")
def encoder_gguf(tiny_encoder, tmp_path_factory):
    """A family's checkpoint converted by edge-llm (cached per family and type)."""
    made = {}

    def get(name: str, outtype: str = "f32"):
        if (name, outtype) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{outtype}")
            made[name, outtype] = convert(tiny_encoder(name).path, folder / f"{name}.gguf", outtype=outtype)
        return made[name, outtype]

    return get


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("family", list(EMBEDDING_FAMILIES))
def test_same_gguf_as_llama_cpp_converter(family, tiny_encoder, tmp_path):
    """Every tensor and every key llama.cpp reads, against llama.cpp's own converter (the pooling
    from the sentence-transformers modules, the classification heads, the vocabularies)."""
    spec = EMBEDDING_FAMILIES[family]
    tiny = tiny_encoder(family)
    ours = convert(tiny.path, tmp_path / "ours.gguf", outtype="f16")
    reference = reference_gguf(tiny.path, "f16", pre=spec.pre, patch=spec.upstream_patch)
    assert gguf_differences(reference, ours) == {key: what for key, (what, _why) in spec.differences.items()}
    assert model_kind(ours).kind == tiny.kind


@pytest.mark.parametrize("family", list(EMBEDDING_FAMILIES))
def test_matches_sentence_transformers(family, tiny_encoder, encoder_gguf, monkeypatch):
    """The f32 file's vectors (cosine > 0.9999 with sentence-transformers') and scores (within 0.5%
    of the reference's largest) from edge-llm's engine, and the same tokens as the HF tokenizer.
    Nothing reaches the network (HF_HUB_OFFLINE)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = tiny_encoder(family)
    engine = load_engine(str(encoder_gguf(family)))
    try:
        assert engine.kind == tiny.kind
        if tiny.kind == "embedding":
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(tiny.path)
            for text in TEXTS:
                assert engine.input_tokens(text) == tok(text)["input_ids"], text
            ours = np.array(asyncio.run(engine.embeddings(TEXTS)).vectors)
            theirs = tiny.reference(TEXTS)
            cos = _cosines(ours, theirs)
            assert cos.min() > 0.9999, cos
            assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
            # the texts are told apart (random tiny models can map everything to one direction)
            assert _cosines(ours[:1], ours[1:]).max() < 0.999
        else:
            ours = np.array(asyncio.run(engine.rerank(QUERY, TEXTS)).scores)
            theirs = tiny.reference(QUERY, TEXTS)
            # llama.cpp's CPU GELU reads an f16 table: a cross-encoder's logit moves by ~1e-3
            assert np.abs(ours - theirs).max() < 5e-3 * max(1.0, np.abs(theirs).max()), (ours, theirs)
            assert np.ptp(theirs) > 1e-3  # the scores differ between documents
    finally:
        engine.close()


def test_bert_cross_encoder_segment_ids_are_what_llama_cpp_ignores(tiny_encoder, encoder_gguf):
    """llama.cpp gives every token segment 0; sentence-transformers gives a BERT cross-encoder's
    document segment 1. With the token_type_embeddings' second row equal to the first the two agree,
    so the difference is that alone (the converter and the graph are right)."""
    import shutil

    import torch
    import transformers

    tiny = tiny_encoder("bert-reranker")
    engine = load_engine(str(encoder_gguf("bert-reranker")))
    try:
        ours = np.array(asyncio.run(engine.rerank(QUERY, TEXTS)).scores)
    finally:
        engine.close()
    folder = tiny.path.parent / "segment-a-only"
    shutil.copytree(tiny.path, folder, dirs_exist_ok=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        types = model.bert.embeddings.token_type_embeddings.weight
        types[1] = types[0]
    model.save_pretrained(folder)
    from sentence_transformers import CrossEncoder

    cross = CrossEncoder(str(folder), device="cpu", local_files_only=True, activation_fn=torch.nn.Identity())
    theirs = cross.predict([(QUERY, d) for d in TEXTS], convert_to_numpy=True)
    assert np.abs(ours - theirs).max() < 5e-3 * max(1.0, np.abs(theirs).max())
