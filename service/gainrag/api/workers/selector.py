"""The selector worker (``gainrag worker selector``): ``POST /rerank`` in vLLM/Jina shape, and
``POST /v1/rerank`` and ``/v2/rerank`` in Cohere's shape (what the ``cohere`` SDK calls).

Pairs of concurrent requests are packed by the cross-encoder's dynamic batcher up to the pair
budget (``GAINRAG_SELECTOR__MAX_BATCH_PAIRS``) or the short wait (``MAX_WAIT_MS``), sorted by
length, scored fp16 on GPU (fp32 on CPU), and every caller gets its own scores back in order.
A request whose client went away is dropped before it reaches the model; a full queue is a 429.
Unlike vLLM's default there is no cap of 32 documents: GainRAG scores k + 1 = 101 at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from math import ceil

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
    CohereApiVersion,
    CohereBilledUnits,
    CohereMeta,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereRerankResult,
    CohereTokens,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    Usage,
)
from gainrag.textcheck import check_text
from gainrag.wire import TEXT_OR_EMPTY_PATTERN, ErrorResponse, query_schema
from gainrag.wiring import build_cross_encoder

_ERRORS: dict[int | str, dict[str, object]] = {
    c: {"model": ErrorResponse} for c in (401, 400, 413, 422, 429, 502, 503)
}


def _models(s: CrossEncoderSelector) -> dict[str, str]:
    return {"selector": s.name, "selector_version": s.version, "device": s.scorer.device}


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _truncate_tokens(sel: CrossEncoderSelector, text: str, n: int) -> str:
    """``text`` cut after its first ``n`` model tokens (the characters they cover, so the text
    is not re-spelled by decoding)."""
    enc = sel.scorer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return text if len(offsets) <= n else text[: offsets[n - 1][1]]


CohereHandler = Callable[[str, CohereRerankRequest, Request], Awaitable[CohereRerankResponse]]


def _cohere_endpoint(
    version: str, handler: CohereHandler
) -> Callable[[CohereRerankRequest, Request], Awaitable[CohereRerankResponse]]:
    """The route function of one Cohere API version (FastAPI reads its signature)."""

    async def endpoint(body: CohereRerankRequest, request: Request) -> CohereRerankResponse:
        return await handler(version, body, request)

    client = "ClientV2" if version == "2" else "Client"
    endpoint.__doc__ = (
        f"Cohere's rerank API v{version} (what ``cohere.{client}.rerank`` calls): relevance "
        "scores in [0, 1] (sigmoid of the logit), best first."
    )
    endpoint.__name__ = f"rerank_v{version}"
    return endpoint


def create_selector_app(
    settings: Settings | None = None, selector: CrossEncoderSelector | None = None
) -> FastAPI:
    """The selector worker app (``selector`` lets tests share a loaded one)."""
    settings = settings or Settings()
    router = APIRouter()
    w = settings.worker

    def checked(
        request: Request, query: str, documents: list[str]
    ) -> tuple[CrossEncoderSelector, str, list[str]]:
        """The loaded model (or 503), and the query and documents checked and in NFC (or 422)."""
        state: WorkerState[CrossEncoderSelector] = request.app.state.worker
        sel = state.require()
        if len(documents) > w.max_documents:
            raise ValidationFailedError(
                f"{len(documents)} documents; the limit is {w.max_documents} per request "
                "(GAINRAG_WORKER__MAX_DOCUMENTS)",
                code="too_many_documents",
            )
        query = require_query("'query'", query, w.max_text_chars)
        return sel, query, require_documents(documents, w.max_text_chars)

    async def score(
        request: Request, sel: CrossEncoderSelector, query: str, documents: list[str]
    ) -> tuple[list[float], int]:
        """One logit per document and the tokens scored; 502 on non-finite scores."""
        scores, tokens = await until_disconnect(request, sel.score_texts(query, documents))
        if not all(math.isfinite(x) for x in scores):
            # e.g. fp16 overflow: JSON has no NaN, and ranking on one would be silently wrong
            raise UpstreamError("the model returned non-finite scores", code="select_failed")
        return scores, tokens

    async def cohere_rerank(
        version: str, body: CohereRerankRequest, request: Request
    ) -> CohereRerankResponse:
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        sel, query, documents = checked(request, body.query, texts)
        for i, d in enumerate(body.documents):  # fields returned as given must encode as UTF-8
            if not isinstance(d, str):
                for k in d.model_extra or {}:
                    check_text(f"documents[{i}] field name", k, code="invalid_document")
        if body.max_tokens_per_doc is not None:
            documents = [_truncate_tokens(sel, d, body.max_tokens_per_doc) for d in documents]
        scores, tokens = await score(request, sel, query, documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]

        def document(i: int) -> dict[str, str] | None:
            if not body.return_documents:
                return None
            d = body.documents[i]
            return {"text": d} if isinstance(d, str) else d.model_dump()  # with other fields

        return CohereRerankResponse(
            id=f"rerank-{request.state.request_id}",
            results=[
                CohereRerankResult(
                    index=i, relevance_score=_sigmoid(scores[i]), document=document(i)
                )
                for i in order
            ],
            meta=CohereMeta(
                api_version=CohereApiVersion(version=version),
                billed_units=CohereBilledUnits(search_units=ceil(len(documents) / 100)),
                tokens=CohereTokens(input_tokens=tokens),
            ),
        )

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
        sel, query, documents = checked(request, body.query, body.documents)
        scores, tokens = await score(request, sel, query, documents)
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

    for version in ("1", "2"):
        router.add_api_route(
            f"/v{version}/rerank",
            _cohere_endpoint(version, cohere_rerank),
            methods=["POST"],
            dependencies=[WorkerToken],
            response_model=CohereRerankResponse,
            responses=_ERRORS,
            response_model_exclude_none=True,
            summary=f"Rerank (Cohere API v{version})",
        )

    app = worker_app(
        "gainrag selector worker",
        "GainRAG selector: a cross-encoder with dynamic batching across concurrent requests.",
        settings,
        load,
        _models,
        router,
        service="selector",
        model=selector,
    )
    declare_limits(
        app,
        {
            "RerankRequest.query": query_schema(w.max_text_chars),
            "RerankRequest.documents": {"maxItems": w.max_documents},
            "RerankRequest.documents[]": {
                "maxLength": w.max_text_chars,
                "pattern": TEXT_OR_EMPTY_PATTERN,
            },
            "CohereRerankRequest.query": query_schema(w.max_text_chars),
            "CohereRerankRequest.documents": {"maxItems": w.max_documents},
            "CohereRerankRequest.documents[]": {
                "maxLength": w.max_text_chars,
                "pattern": TEXT_OR_EMPTY_PATTERN,
            },
            "CohereDocument.text": {
                "maxLength": w.max_text_chars,
                "pattern": TEXT_OR_EMPTY_PATTERN,
            },
        },
    )
    return app
