"""What the retrieval and selector workers share: the lifecycle (load in the background, serve
``/health`` at once and ``/ready`` once the model is in, close it at shutdown) and the checks of
query and document text."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from gainrag.api.base_app import base_app
from gainrag.api.openapi import hide_security
from gainrag.config import Settings
from gainrag.errors import GainRAGError, UnavailableError, ValidationFailedError
from gainrag.textcheck import check_text, is_blank
from gainrag.wire import ErrorResponse

log = logging.getLogger(__name__)
M = TypeVar("M")


@dataclass
class WorkerState(Generic[M]):
    """The loaded model (None until ready) and why loading failed, if it did."""

    settings: Settings
    model: M | None = None
    load_error: str | None = None
    models: Callable[[M], dict[str, str]] = field(default=lambda _m: {})

    def require(self) -> M:
        """The model, or 503 while it loads (or with the reason loading failed)."""
        if self.model is None:
            if self.load_error is not None:
                raise UnavailableError(self.load_error, code="load_failed")
            raise UnavailableError("the model is still loading; retry shortly", code="not_ready")
        return self.model


def require_query(label: str, text: str, limit: int) -> str:
    """``text`` in NFC, or 422 ``invalid_query`` unless it is visible text of at most ``limit``
    characters without lone surrogates or control characters (see :mod:`gainrag.textcheck`)."""
    if is_blank(text) or len(text) > limit:
        raise ValidationFailedError(
            f"{label} must be non-empty text of at most {limit} characters "
            "(GAINRAG_WORKER__MAX_TEXT_CHARS)",
            code="invalid_query",
        )
    return check_text(label, text, code="invalid_query")


def require_documents(documents: list[str], limit: int) -> list[str]:
    """The documents in NFC, or 422 naming the first bad one: ``document_too_long`` or
    ``invalid_document`` (lone surrogate, control character). Empty documents are allowed."""
    if any(len(d) > limit for d in documents):
        raise ValidationFailedError(
            f"every document must be at most {limit} characters (GAINRAG_WORKER__MAX_TEXT_CHARS)",
            code="document_too_long",
        )
    return [
        check_text(f"documents[{i}]", d, code="invalid_document") for i, d in enumerate(documents)
    ]


def worker_app(
    title: str,
    description: str,
    settings: Settings,
    load: Callable[[], M],
    models: Callable[[M], dict[str, str]],
    router: APIRouter,
    *,
    service: str,
    model: M | None = None,
    body_limits: dict[str, int] | None = None,
) -> FastAPI:
    """A worker app around ``load()`` (run in a thread at start-up) and the worker's routes.

    ``model`` lets tests share an already-loaded model (it is not closed at shutdown);
    ``body_limits``: per-path body limits other than ``worker.max_body_bytes``.
    """
    state: WorkerState[M] = WorkerState(settings=settings, models=models)

    async def load_in_background() -> None:
        try:
            state.model = await asyncio.to_thread(load)
        except GainRAGError as exc:
            state.load_error = exc.message
            log.error("%s: loading failed: %s", title, exc.message)
            return
        except Exception:
            state.load_error = "loading failed; see the worker log"
            log.exception("%s: loading failed", title)
            return
        log.info("%s ready: %s", title, models(state.model))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if model is not None:
            state.model = model
        else:
            loader = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            if loader is not None:
                await loader
                loaded: Any = state.model
                state.model = None
                if loaded is not None:
                    await loaded.close()

    app = base_app(
        title,
        description,
        max_body_bytes=settings.worker.max_body_bytes,
        lifespan=lifespan,
        http=settings.http,
        body_limits=body_limits,
        tracing_settings=settings.tracing,
        service=service,
    )
    app.state.worker = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process is up."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the model is loaded and the worker is not draining; lists model names and
        versions."""
        if app.state.drain.draining:
            raise UnavailableError("the worker is shutting down", code="shutting_down")
        m = state.require()
        return JSONResponse({"status": "ready", "models": state.models(m)})

    app.include_router(router)
    if settings.worker.api_token is None:
        hide_security(app)
    return app
