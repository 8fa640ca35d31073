"""What every gainrag HTTP process shares: request ids, body limits, the drain, error shape,
``/metrics`` and the API docs.

The gateway and both workers are built on :func:`base_app`, so a client sees one error shape and
one metrics endpoint whichever process it talks to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gainrag import __version__, telemetry, tracing
from gainrag.api.auth import require_key
from gainrag.api.drain import Drain
from gainrag.api.errors import install_error_handlers
from gainrag.api.middleware import RequestContextMiddleware
from gainrag.config import Access, HttpSettings, TracingSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


async def _metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    data, content_type = telemetry.render()
    return Response(data, media_type=content_type)


def base_app(
    title: str,
    description: str,
    *,
    max_body_bytes: int,
    lifespan: Lifespan,
    http: HttpSettings | None = None,
    metrics_access: Access = "public",
    docs_access: Access = "public",
    body_limits: dict[str, int] | None = None,
    tracing_settings: TracingSettings | None = None,
    service: str = "gateway",
) -> FastAPI:
    """A FastAPI app with the shared middleware, error handlers, ``GET /metrics`` and docs.

    ``body_limits``: a larger (or smaller) body limit for some paths. ``tracing_settings``: turn
    on OpenTelemetry for this process as ``service`` (gateway, retrieval, selector).
    ``*_access``: 'public', 'key' (the gateway's :func:`~gainrag.api.auth.require_key`; the app
    must have ``state.auth``) or 'off' (404).
    """
    public_docs = docs_access == "public"
    app = FastAPI(
        title=title,
        version=__version__,
        description=description,
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.state.drain = Drain()
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=max_body_bytes,
        body_timeout_s=(http or HttpSettings()).body_timeout_s,
        drain=app.state.drain,
        body_limits=body_limits,
    )
    install_error_handlers(app)
    if tracing_settings is not None:
        tracing.setup(tracing_settings, service)
        tracing.instrument_app(app)
    guard: dict[str, Any] = {"dependencies": [Depends(require_key)], "include_in_schema": False}
    if metrics_access != "off":
        kw = guard if metrics_access == "key" else {"include_in_schema": False}
        app.add_api_route("/metrics", _metrics, methods=["GET"], **kw)
    if docs_access == "key":
        _keyed_docs(app, guard)
    return app


def _keyed_docs(app: FastAPI, guard: dict[str, Any]) -> None:
    """/openapi.json, /docs and /redoc behind an API key (FastAPI's own are public only)."""

    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    app.add_api_route("/openapi.json", openapi, methods=["GET"], **guard)
    app.add_api_route("/docs", docs, methods=["GET"], **guard)
    app.add_api_route("/redoc", redoc, methods=["GET"], **guard)
