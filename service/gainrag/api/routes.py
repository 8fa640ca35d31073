"""Route handlers: thin wrappers that validate, call the pipeline and shape the response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from gainrag.api.auth import ApiPrincipal
from gainrag.api.schemas import (
    AnswerRequest,
    AnswerResponse,
    DegradationOut,
    ErrorResponse,
    PassageOut,
    Timings,
)
from gainrag.errors import ClientClosedError, UnavailableError
from gainrag.pipeline import CheckedQuery, Pipeline
from gainrag.types import Scored

if TYPE_CHECKING:
    from gainrag.api.app import AppState

router = APIRouter()
T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 502, 503, 504)
}


def app_state(request: Request) -> AppState:
    """The gateway's state (settings, admission, pipeline)."""
    state: AppState = request.app.state.gainrag
    return state


def loaded_pipeline(request: Request) -> Pipeline:
    """The pipeline, once loaded (else 503 ``not_ready`` / ``load_failed``)."""
    state = app_state(request)
    if state.pipeline is None:
        raise _not_ready(state)
    return state.pipeline


async def checked_query(
    body: AnswerRequest, pipeline: Annotated[Pipeline, Depends(loaded_pipeline)]
) -> CheckedQuery:
    """Every 4xx that needs no model (text, length in tokens, top_n), before admission.

    Async: the check is a tokenisation of at most a few hundred microseconds, cheaper on the
    event loop than a hop to the thread pool.
    """
    return pipeline.check(body.question, body.top_n)


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
    principal: ApiPrincipal,
    pipeline: Annotated[Pipeline, Depends(loaded_pipeline)],
    checked: Annotated[CheckedQuery, Depends(checked_query)],
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
    async with app_state(request).admission.slot(principal, "/answer"):
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
    """Readiness: models and index are loaded, and the server is not draining."""
    state = app_state(request)
    if state.admission.drain.draining:
        raise UnavailableError("the server is shutting down", code="shutting_down")
    if state.pipeline is None:
        raise _not_ready(state)
    return JSONResponse({"status": "ready", "models": state.pipeline.models})
