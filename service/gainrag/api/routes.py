"""Route handlers: thin wrappers that validate, call the pipeline and shape the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from gainrag.api.schemas import (
    AnswerRequest,
    AnswerResponse,
    DegradationOut,
    ErrorResponse,
    PassageOut,
    Timings,
)
from gainrag.errors import ClientClosedError, OverloadedError, UnavailableError
from gainrag.pipeline import CheckedQuery, Pipeline
from gainrag.types import Scored

if TYPE_CHECKING:
    from gainrag.api.app import AppState

router = APIRouter()
T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 502, 503, 504)
}


async def checked_query(body: AnswerRequest, request: Request) -> CheckedQuery:
    """Every 4xx that needs no model, answered before the request takes an in-flight slot.

    A dependency of :func:`admitted_pipeline`, so FastAPI skips admission when the body is
    malformed too (its validation errors are raised only after the other dependencies ran).
    Async: the check is a tokenisation of at most a few hundred microseconds, cheaper on the
    event loop than a hop to the thread pool.
    """
    state = request.app.state.gainrag
    if state.pipeline is None:
        raise _not_ready(state)
    pipeline: Pipeline = state.pipeline
    return pipeline.check(body.question, body.top_n)


async def admitted_pipeline(
    request: Request, _checked: Annotated[CheckedQuery, Depends(checked_query)]
) -> AsyncIterator[Pipeline]:
    """The pipeline, if loaded and under the in-flight limit (else 503 / 429)."""
    state = request.app.state.gainrag
    if state.pipeline is None:
        raise _not_ready(state)
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


def _not_ready(state: AppState) -> UnavailableError:
    if state.load_error is not None:
        return UnavailableError(state.load_error, code="load_failed")
    return UnavailableError("models are still loading; retry shortly", code="not_ready")


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect: the client went away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client disconnects first, in which case cancel it.

    Starlette does not cancel a handler whose client left; without this, abandoned requests would
    keep the models busy until their deadline.
    """
    work = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    raise ClientClosedError("client disconnected; the request was cancelled")


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
    checked: Annotated[CheckedQuery, Depends(checked_query)],  # before admission
    pipeline: Annotated[Pipeline, Depends(admitted_pipeline)],
    cache_control: Annotated[str | None, Header()] = None,
) -> Response:
    """Answer a question with GainRAG: retrieve || pseudo-passage, select, generate.

    ``Cache-Control: no-cache`` computes a fresh answer (and stores it) instead of reading the
    cache; ``cached`` and the ``X-Cache`` header say whether the answer came from it.
    """
    use_cache = not _no_cache(cache_control)
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
async def ready(request: Request) -> JSONResponse:
    """Readiness: models and index are loaded."""
    state = request.app.state.gainrag
    if state.pipeline is None:
        raise _not_ready(state)
    return JSONResponse({"status": "ready", "models": state.pipeline.models})
