"""``create_app(settings)``: the FastAPI gateway with its lifespan-managed pipeline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from gainrag.api.admission import Admission
from gainrag.api.auth import Authenticator
from gainrag.api.base_app import base_app
from gainrag.api.documents import router as documents_router
from gainrag.api.feedback import router as feedback_router
from gainrag.api.openai_compat import router as openai_router
from gainrag.api.openapi import declare_limits, hide_security
from gainrag.api.playground import install_playground
from gainrag.api.routes import router
from gainrag.api.state import AppState
from gainrag.config import Settings
from gainrag.errors import GainRAGError
from gainrag.pipeline import Components, Pipeline
from gainrag.retrieval.wire import documents_limits
from gainrag.wire import query_schema
from gainrag.wiring import build_components

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    """Build the gateway.

    Models load in the background after start-up, so ``/health`` answers at once and ``/ready``
    turns 200 when they are in (503 until then, or with the reason if loading failed).
    ``components`` lets a caller (tests, eval) share already-loaded models; those are not closed
    at shutdown. A keys file that cannot be read fails here, at start-up (fail closed).
    """
    settings = settings or Settings()
    auth = Authenticator(settings.api)

    async def load(state: AppState) -> Components | None:
        try:
            # Blocking CPU/disk work: keep it off the event loop.
            comps = await asyncio.to_thread(build_components, settings)
            await comps.refresh()  # versions of remote workers, for cache keys and responses
            state.pipeline = Pipeline(settings, comps)
        except GainRAGError as exc:
            state.load_error = exc.message
            log.error("model loading failed: %s", exc.message)
            return None
        except Exception:
            state.load_error = "model loading failed; see the server log"
            log.exception("model loading failed")
            return None
        log.info("ready: %s", state.pipeline.models)
        return comps

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.gainrag
        loader: asyncio.Task[Components | None] | None = None
        if components is not None:
            await components.refresh()
            state.pipeline = Pipeline(settings, components)
        else:
            loader = asyncio.create_task(load(state))
        try:
            yield
        finally:
            state.pipeline = None
            if loader is not None:
                comps = await loader  # a load in progress finishes (threads cannot be killed)
                if comps is not None:
                    await comps.close()
            await state.admission.close()

    app = base_app(
        "gainrag",
        "GainRAG inference: retrieve || pseudo-passage -> select -> generate.",
        max_body_bytes=settings.api.max_body_bytes,
        body_limits={"/v1/documents": settings.documents.max_body_bytes},
        lifespan=lifespan,
        http=settings.http,
        metrics_access=settings.api.metrics_access,
        docs_access=settings.api.docs_access,
        tracing_settings=settings.tracing,
        service="gateway",
    )
    app.state.auth = auth
    admission = Admission(settings.api.max_in_flight, app.state.drain, settings.redis)
    app.state.gainrag = AppState(settings=settings, admission=admission)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(documents_router)
    app.include_router(feedback_router)  # its lifespan opens and closes the feedback log
    install_playground(app, settings)
    # The configured bounds, stated in the schema (pydantic must not enforce them: the API's own
    # codes such as empty_question and top_n_out_of_range would become generic ones).
    d = settings.documents
    declare_limits(
        app,
        {
            "AnswerRequest.question": query_schema(settings.api.max_question_chars),
            "AnswerRequest.top_n": {"minimum": 1, "maximum": settings.pipeline.max_top_n},
            **documents_limits(d.max_documents, d.max_document_chars),
        },
    )
    if settings.api.keys_file is None:
        hide_security(app)
    if settings.api.cors_origins:  # off by default: browsers get no cross-origin access
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "cache-control", "x-request-id"],
            expose_headers=["x-request-id", "x-cache", "retry-after"],
            max_age=600,
        )
    return app
