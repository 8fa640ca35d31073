"""The selector worker (``gainrag worker selector``): ``POST /rerank`` in vLLM/Jina shape.

Pairs of concurrent requests are packed by the cross-encoder's dynamic batcher up to the pair
budget (``GAINRAG_SELECTOR__MAX_BATCH_PAIRS``) or the short wait (``MAX_WAIT_MS``), sorted by
length, scored fp16 on GPU (fp32 on CPU), and every caller gets its own scores back in order.
A request whose client went away is dropped before it reaches the model; a full queue is a 429.
Unlike vLLM's default there is no cap of 32 documents: GainRAG scores k + 1 = 101 at once.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, FastAPI, Request

from gainrag.api.auth import WorkerToken
from gainrag.api.cancel import until_disconnect
from gainrag.api.openapi import declare_limits
from gainrag.api.workers.shared import (
    WorkerState,
    require_documents,
    require_query,
    worker_app,
)
from gainrag.config import Settings
from gainrag.errors import UpstreamError, ValidationFailedError
from gainrag.selector.cross_encoder import CrossEncoderSelector
from gainrag.selector.wire import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    Usage,
)
from gainrag.wire import TEXT_OR_EMPTY_PATTERN, ErrorResponse, query_schema
from gainrag.wiring import build_cross_encoder

_ERRORS: dict[int | str, dict[str, object]] = {
    c: {"model": ErrorResponse} for c in (401, 400, 413, 422, 429, 502, 503)
}


def _models(s: CrossEncoderSelector) -> dict[str, str]:
    return {"selector": s.name, "selector_version": s.version, "device": s.scorer.device}


def create_selector_app(
    settings: Settings | None = None, selector: CrossEncoderSelector | None = None
) -> FastAPI:
    """The selector worker app (``selector`` lets tests share a loaded one)."""
    settings = settings or Settings()
    router = APIRouter()

    def load() -> CrossEncoderSelector:
        built = build_cross_encoder(settings)
        assert isinstance(built, CrossEncoderSelector)
        return built

    @router.post(
        "/rerank",
        dependencies=[WorkerToken],
        response_model=RerankResponse,
        responses=_ERRORS,
        response_model_exclude_none=True,
    )
    async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
        """Score every document against the query."""
        state: WorkerState[CrossEncoderSelector] = request.app.state.worker
        sel = state.require()
        w = settings.worker
        if len(body.documents) > w.max_documents:
            raise ValidationFailedError(
                f"{len(body.documents)} documents; the limit is {w.max_documents} per request "
                "(GAINRAG_WORKER__MAX_DOCUMENTS)",
                code="too_many_documents",
            )
        query = require_query("'query'", body.query, w.max_text_chars)
        documents = require_documents(body.documents, w.max_text_chars)
        scores, tokens = await until_disconnect(request, sel.score_texts(query, documents))
        if not all(math.isfinite(x) for x in scores):
            # e.g. fp16 overflow: JSON has no NaN, and ranking on one would be silently wrong
            raise UpstreamError("the model returned non-finite scores", code="select_failed")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        if body.top_n is not None:
            order = order[: body.top_n]
        return RerankResponse(
            id=f"rerank-{request.state.request_id}",
            model=sel.name,
            model_version=sel.version,
            results=[
                RerankResult(
                    index=i,
                    relevance_score=scores[i],
                    document=RerankDocument(text=body.documents[i])
                    if body.return_documents
                    else None,
                )
                for i in order
            ],
            usage=Usage(total_tokens=tokens),
        )

    app = worker_app(
        "gainrag selector worker",
        "GainRAG selector: a cross-encoder with dynamic batching across concurrent requests.",
        settings,
        load,
        _models,
        router,
        model=selector,
    )
    w = settings.worker
    declare_limits(
        app,
        {
            "RerankRequest.query": query_schema(w.max_text_chars),
            "RerankRequest.documents": {"maxItems": w.max_documents},
            "RerankRequest.documents[]": {
                "maxLength": w.max_text_chars,
                "pattern": TEXT_OR_EMPTY_PATTERN,
            },
        },
    )
    return app
