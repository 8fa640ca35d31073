"""The gateway's request dependencies, as ``Annotated`` aliases for route signatures.

``pipeline: PipelineDep`` is the loaded pipeline (503 until then), ``principal: PrincipalDep``
the authenticated caller (:mod:`gainrag.api.auth`). The question's checks (422 before the request
takes a slot) run in the request skeleton, :func:`gainrag.api.answering.answer_request`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gainrag.api.auth import ApiPrincipal
from gainrag.api.state import AppState
from gainrag.pipeline import Pipeline


# async although nothing here awaits: FastAPI runs a plain ``def`` dependency in its thread pool,
# a hop per request that these attribute reads do not need.
async def app_state(request: Request) -> AppState:
    """The gateway's state (settings, admission, pipeline)."""
    state: AppState = request.app.state.gainrag
    return state


StateDep = Annotated[AppState, Depends(app_state)]


async def loaded_pipeline(state: StateDep) -> Pipeline:
    """The pipeline, once loaded (else 503 ``not_ready`` / ``load_failed``)."""
    return state.require_pipeline()


PipelineDep = Annotated[Pipeline, Depends(loaded_pipeline)]


PrincipalDep = ApiPrincipal
"""The caller (every public route takes one; see :mod:`gainrag.api.auth`)."""
