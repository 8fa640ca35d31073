"""The one request skeleton of the routes that answer a question (``POST /answer`` and
``POST /v1/chat/completions``).

:func:`answer_request` runs, for both routes and both modes, every step that decides a status
code or a header: the question's checks (422s, before the request takes a slot), the cache choice
(``Cache-Control: no-cache``), then either the admission slot around the pipeline's answer,
cancelled if the client leaves, or an :class:`~gainrag.api.streaming.AnswerStream` (slot,
pipeline up to the citation, disconnect), and the ``X-Cache`` header; every answer served, cache
hits included, is recorded for feedback (:mod:`gainrag.feedback`, best effort, never waited
for). A route brings only its output format, a :class:`Shape`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gainrag.api.auth import Principal
from gainrag.api.cancel import until_disconnect
from gainrag.api.schemas import PassageOut
from gainrag.api.state import AppState
from gainrag.api.streaming import SSE_HEADERS, AnswerStream, error_body, guarded, sse
from gainrag.feedback import Served
from gainrag.pipeline import CheckedQuery
from gainrag.types import AnswerResult, Scored, document_id


@dataclass(frozen=True)
class Shape:
    """How one route writes an answer; everything else is :func:`answer_request`'s."""

    body: Callable[[CheckedQuery, AnswerResult], str | bytes]
    """The JSON body of a non-streamed answer."""
    events: Callable[[CheckedQuery, AnswerStream], AsyncIterator[bytes]]
    """The SSE bytes of a streamed answer, from its context (the citation) to its end."""
    error_event: str | None
    """The event name of a failure after the first byte (None: a bare ``data:`` line)."""
    stream_x_cache: bool = True
    """Whether a streamed answer's response carries ``X-Cache`` too (the OpenAI route's does not
    so far)."""

    def error(self, exc: BaseException) -> bytes:
        """The last event of a stream that failed after its first byte."""
        return sse(error_body(exc), self.error_event)


async def answer_request(
    request: Request,
    state: AppState,
    principal: Principal,
    shape: Shape,
    *,
    route: str,
    question: str,
    top_n: int | None,
    stream: bool,
    cache_control: str | None,
) -> Response:
    """Check, admit, answer (streamed or not) and say whether the answer came from the cache.

    ``route`` labels the admission slot and its metrics. ``cache_control`` is the request's
    ``Cache-Control`` header, for a route that honours it (None otherwise).
    """
    pipeline = state.require_pipeline()
    checked = pipeline.check(question, top_n)  # 422s before the request takes a slot
    # Others' no-cache would be a cache-bypass lever on the expensive path: ignored, not refused.
    use_cache = not (_no_cache(cache_control) and principal.can_refresh)
    record = _recorder(request, state, principal, route, checked, stream=stream)
    if stream:
        # Admission and the pipeline up to the citation happen here, so their errors keep their
        # status; later ones become the route's error event.
        answer = await AnswerStream.open(
            request, state, principal, route, checked, use_cache=use_cache, on_result=record
        )
        headers = dict(SSE_HEADERS)
        if shape.stream_x_cache:
            headers["x-cache"] = _x_cache(answer.context.cached)
        return StreamingResponse(
            guarded(shape.events(checked, answer), shape.error),
            media_type="text/event-stream",
            headers=headers,
        )
    # The slot is taken here, in the handler, not in a dependency: FastAPI raises body-validation
    # errors only once all dependencies ran, so a slot taken in one would turn 422s into 429s.
    async with state.admission.slot(principal, route):
        # Starlette does not cancel a handler whose client left: this does.
        result = await until_disconnect(request, pipeline.answer(checked, use_cache=use_cache))
    if record is not None:
        record(result)
    return Response(
        shape.body(checked, result),
        media_type="application/json",
        headers={"x-cache": _x_cache(result.cached)},
    )


def _recorder(
    request: Request,
    state: AppState,
    principal: Principal,
    route: str,
    checked: CheckedQuery,
    *,
    stream: bool,
) -> Callable[[AnswerResult], None] | None:
    """What records this request's answer for feedback (None: feedback is off)."""
    feedback, pipeline = state.feedback, state.pipeline
    if feedback is None or pipeline is None:
        return None

    def record(result: AnswerResult) -> None:
        feedback.record(
            lambda: Served(
                request_id=request.state.request_id,
                key=principal.name,
                route=route,
                stream=stream,
                served_at=time.time(),
                question=checked.question,
                top_n=checked.top_n,
                models=pipeline.models,
                result=result,
            )
        )

    return record


def passage_out(s: Scored) -> PassageOut:
    """The wire form of a scored passage (``/answer``'s passages, the OpenAI citations)."""
    p = s.passage
    return PassageOut(
        id=p.id,
        document_id=None if p.pseudo else document_id(p.id),
        title=p.title,
        text=p.text,
        score=s.score,
        pseudo=p.pseudo,
        retrieval_rank=s.retrieval_rank,
        retrieval_score=s.retrieval_score,
        selector_score=s.selector_score,
    )


def _x_cache(cached: bool) -> str:
    return "HIT" if cached else "MISS"


def _no_cache(header: str | None) -> bool:
    if not header:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in header.split(",")}
    return bool(directives & {"no-cache", "no-store"})
