"""``create_app(settings)``: the FastAPI gateway with its lifespan-managed pipeline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from gainrag import __version__
from gainrag.api.errors import install_error_handlers
from gainrag.api.middleware import RequestContextMiddleware
from gainrag.api.routes import router
from gainrag.config import Settings
from gainrag.pipeline import Components, Pipeline, build_components

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the routes need, created once in the lifespan."""

    settings: Settings
    pipeline: Pipeline | None = None
    in_flight: int = 0
    load_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    """Build the gateway. ``components`` lets a caller (tests, eval) share already-loaded models;
    by default they are built from ``settings`` at start-up and closed at shutdown."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.gainrag
        owned = components is None
        # Model loading is blocking CPU/disk work: keep it off the event loop.
        comps = (
            components
            if components is not None
            else await asyncio.to_thread(build_components, settings)
        )
        state.pipeline = Pipeline(settings, comps)
        log.info("ready: %s", state.pipeline.models)
        try:
            yield
        finally:
            state.pipeline = None
            if owned:
                await comps.close()

    app = FastAPI(
        title="gainrag",
        version=__version__,
        description="GainRAG inference: retrieve || pseudo-passage -> select -> generate.",
        lifespan=lifespan,
    )
    app.state.gainrag = AppState(settings=settings)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.api.max_body_bytes)
    install_error_handlers(app)
    app.include_router(router)
    return app
