"""Route handlers: thin wrappers that validate, call the pipeline and shape the response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gainrag.api.schemas import AnswerRequest, AnswerResponse, ErrorResponse, PassageOut, Timings
from gainrag.errors import OverloadedError, UnavailableError
from gainrag.pipeline import Pipeline
from gainrag.types import Scored

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 422, 429, 502, 503, 504)
}


async def admitted_pipeline(request: Request) -> AsyncIterator[Pipeline]:
    """The pipeline, if loaded and under the in-flight limit (else 503 / 429)."""
    state = request.app.state.gainrag
    if state.pipeline is None:
        raise UnavailableError("models are still loading; retry shortly", code="not_ready")
    if state.in_flight >= state.settings.api.max_in_flight:
        raise OverloadedError(
            f"{state.in_flight} requests in flight (limit {state.settings.api.max_in_flight}); "
            "retry shortly"
        )
    state.in_flight += 1
    try:
        yield state.pipeline
    finally:
        state.in_flight -= 1


def _passage_out(s: Scored) -> PassageOut:
    p = s.passage
    return PassageOut(
        id=p.id,
        title=p.title,
        text=p.text,
        score=s.score,
        pseudo=p.pseudo,
        retrieval_rank=s.retrieval_rank,
        retrieval_score=s.retrieval_score,
    )


@router.post(
    "/answer", response_model=AnswerResponse, responses=_ERRORS, response_model_exclude_none=True
)
async def answer(
    body: AnswerRequest, request: Request, pipeline: Annotated[Pipeline, Depends(admitted_pipeline)]
) -> AnswerResponse:
    """Answer a question with GainRAG: retrieve || pseudo-passage, select, generate."""
    result = await pipeline.answer(body.question, top_n=body.top_n)
    return AnswerResponse(
        request_id=request.state.request_id,
        answer=result.answer,
        passages=[_passage_out(s) for s in result.selected],
        candidates=[_passage_out(s) for s in result.candidates] if body.return_candidates else None,
        pseudo_passage=result.pseudo_passage,
        timings_ms=Timings(**result.timings_ms),
        models=pipeline.models,
    )


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: models and index are loaded."""
    state = request.app.state.gainrag
    if state.pipeline is None:
        raise UnavailableError("models are still loading", code="not_ready")
    return JSONResponse({"status": "ready", "models": state.pipeline.models})
