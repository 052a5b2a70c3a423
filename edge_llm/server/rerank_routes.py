"""Reranking: /v1/rerank and /rerank (and llama-server's /v1/reranking, /reranking), for a served
reranker (a cross-encoder such as bge-reranker, or Qwen3-Reranker).

One body, three shapes, as llama-server reads them: Jina's and Cohere's (`query`, `documents` as
texts or {"text": ...} objects, `top_n`, `return_documents`) get
{"id", "object": "list", "model", "usage", "results": [{"index", "relevance_score", "document"?}],
"meta"}; TEI's (`query`, `texts`, `return_text`) gets the bare list [{"index", "score", "text"?}].
Results are sorted by score, best first, cut to `top_n`. Scores are the model's own (llama-server's):
a cross-encoder's logit, Qwen3-Reranker's P(yes). Every document's pair shares the pooled decodes
with other requests (engines/pooled.py); a client that leaves stops the work.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from edge_llm.errors import InvalidParameterError
from edge_llm.server.jsonio import json_response
from edge_llm.server.pipeline import named, with_engine_until_disconnect
from edge_llm.server.schemas import DOCUMENTED_ERRORS, MAX_RERANK_DOCUMENTS, RerankRequest

router = APIRouter(tags=["rerank"])


def rerank_documents(body: RerankRequest) -> list[str]:
    given = body.documents if body.documents is not None else body.texts
    if not given:
        raise InvalidParameterError("documents must be a non-empty list of texts", param="documents")
    if len(given) > MAX_RERANK_DOCUMENTS:
        raise InvalidParameterError(f"at most {MAX_RERANK_DOCUMENTS} documents per request, got {len(given)}",
                                    param="documents")
    texts = [d if isinstance(d, str) else d.text for d in given]
    if not body.query:
        raise InvalidParameterError("query must not be empty", param="query")
    if any(not t for t in texts):
        raise InvalidParameterError("a document is empty", param="documents")
    return texts


def ranked(scores: list[float], top_n: int | None) -> list[tuple[int, float]]:
    """(index, score) best first; ties keep the documents' order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [(i, scores[i]) for i in order[:top_n]]


@router.post("/v1/rerank", responses=DOCUMENTED_ERRORS)
@router.post("/rerank", include_in_schema=False)
@router.post("/v1/reranking", include_in_schema=False)
@router.post("/reranking", include_in_schema=False)
async def rerank(body: RerankRequest, request: Request) -> Any:
    documents = rerank_documents(body)
    done = await with_engine_until_disconnect(request, body.model,
                                              lambda name, engine: named(name, engine.rerank(body.query, documents)))
    if isinstance(done, Response):
        return done
    name, result = done
    top = ranked(result.scores, body.top_n)
    if body.documents is None:  # TEI's shape
        return await json_response(lambda: [{"index": i, "score": score, **({"text": documents[i]}
                                                                            if body.return_text else {})}
                                            for i, score in top])
    results = [{"index": i, "relevance_score": score, **({"document": {"text": documents[i]}}
                                                         if body.return_documents else {})} for i, score in top]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return await json_response(lambda: {"id": f"rerank-{uuid.uuid4().hex}", "object": "list", "model": name,
                                         "usage": usage, "results": results,
                                         "meta": {"billed_units": {"search_units": 1}}})
