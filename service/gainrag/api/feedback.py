"""``POST /v1/feedback``: a rating (and optionally the right answer) on an answer served before,
named by its request id; thin over :class:`gainrag.feedback.FeedbackLog`.

The log lives as long as the app: this router's lifespan opens it (recording starts with the
first answer) and closes it (what is queued is written) when the app stops.

A key gives feedback on its own answers only: answers are recorded under the key's name, so
another key's request id is as unknown as a made-up one (404, nothing said about whether it
exists). The same key posting again replaces its earlier feedback (``replaced``); so no 409.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from gainrag.api.deps import PrincipalDep, StateDep
from gainrag.api.schemas import FeedbackRequest, FeedbackResponse
from gainrag.api.state import AppState
from gainrag.errors import ForbiddenError, UnavailableError
from gainrag.feedback import FeedbackLog
from gainrag.wire import ErrorResponse


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.gainrag
    if state.settings.feedback.enabled:
        state.feedback = FeedbackLog.open(state.settings)
    try:
        yield
    finally:
        log, state.feedback = state.feedback, None
        if log is not None:
            await log.close()


router = APIRouter(prefix="/v1", tags=["feedback"], lifespan=_lifespan)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)
}


@router.post("/feedback", response_model=FeedbackResponse, responses=_ERRORS)
async def give_feedback(
    body: FeedbackRequest, who: PrincipalDep, state: StateDep
) -> FeedbackResponse:
    """Rate an answer this key was served (within GAINRAG_FEEDBACK__RETENTION_S): 'up' or
    'down', optionally with the correct answer and a comment; stored with the served question,
    candidates, selection and answer. Posting again replaces the earlier feedback."""
    if not state.settings.feedback.enabled:
        raise ForbiddenError(
            "feedback is off on this server (GAINRAG_FEEDBACK__ENABLED=false)",
            code="feedback_disabled",
        )
    log = state.feedback
    if log is None:  # the app is starting or stopping
        raise UnavailableError("feedback is not available yet; retry", code="feedback_unavailable")
    # The same admission as the answer routes: the drain, in-flight limits and the key's rate.
    async with state.admission.slot(who, "/v1/feedback"):
        request_id, replaced = await log.give(
            who.name, body.request_id, body.rating, body.correct_answer, body.comment
        )
    return FeedbackResponse(request_id=request_id, rating=body.rating, replaced=replaced)
