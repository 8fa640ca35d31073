"""Route handlers: thin wrappers that validate, call the pipeline and shape the response."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from gainrag.api.cancel import until_disconnect
from gainrag.api.deps import CheckedQueryDep, PipelineDep, PrincipalDep, StateDep
from gainrag.api.schemas import (
    AnswerRequest,
    AnswerResponse,
    DegradationOut,
    PassageOut,
    Timings,
)
from gainrag.errors import UnavailableError
from gainrag.llm.interface import generator_failure
from gainrag.types import Scored
from gainrag.wire import ErrorResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 502, 503, 504)
}


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
    body: AnswerRequest,
    request: Request,
    principal: PrincipalDep,
    state: StateDep,
    pipeline: PipelineDep,
    checked: CheckedQueryDep,
    cache_control: Annotated[str | None, Header()] = None,
) -> Response:
    """Answer a question with GainRAG: retrieve || pseudo-passage, select, generate.

    ``Cache-Control: no-cache`` computes a fresh answer (and stores it) instead of reading the
    cache, for keys allowed to refresh (every caller when keys are off); ``cached`` and the
    ``X-Cache`` header say whether the answer came from it.
    """
    # Others' no-cache would be a cache-bypass lever on the expensive path: ignored, not refused.
    use_cache = not (_no_cache(cache_control) and principal.can_refresh)
    # The slot is taken here, after every dependency: FastAPI raises body-validation errors only
    # once all dependencies ran, so a slot taken in one would turn a burst of 422s into 429s.
    async with state.admission.slot(principal, "/answer"):
        result = await until_disconnect(request, pipeline.answer(checked, use_cache=use_cache))
    out = AnswerResponse(
        request_id=request.state.request_id,
        answer=result.answer,
        passages=[_passage_out(s) for s in result.selected],
        candidates=[_passage_out(s) for s in result.candidates] if body.return_candidates else None,
        pseudo_passage=result.pseudo_passage,
        timings_ms=Timings(**result.timings_ms),
        models=pipeline.models,
        cached=result.cached,
        degraded=[DegradationOut(kind=d.kind, message=d.message) for d in result.degraded],
    )
    # Serialised here, once, in pydantic's Rust core: returning the model would make FastAPI
    # validate it a second time against response_model (a measurable share of gateway CPU).
    return Response(
        out.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers={"x-cache": "HIT" if result.cached else "MISS"},
    )


def _no_cache(header: str | None) -> bool:
    if not header:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in header.split(",")}
    return bool(directives & {"no-cache", "no-store"})


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(state: StateDep) -> JSONResponse:
    """Readiness: models and index are loaded, and the server is not draining."""
    if state.admission.drain.draining:
        raise UnavailableError("the server is shutting down", code="shutting_down")
    pipeline = state.require_pipeline()
    reason = generator_failure(pipeline.c.generator)  # a managed LLM engine that died
    if reason is not None:
        raise UnavailableError(reason, code="llm_down")
    return JSONResponse({"status": "ready", "models": pipeline.models})
