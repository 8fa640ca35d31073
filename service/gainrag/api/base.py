"""What every gainrag HTTP process shares: request ids, body limit, error shape, ``/metrics``.

The gateway and both workers are built on :func:`base_app`, so a client sees one error shape and
one metrics endpoint whichever process it talks to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from fastapi.responses import Response

from gainrag import __version__, metrics
from gainrag.api.errors import install_error_handlers
from gainrag.api.middleware import RequestContextMiddleware

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


async def _metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)


def base_app(title: str, description: str, *, max_body_bytes: int, lifespan: Lifespan) -> FastAPI:
    """A FastAPI app with the shared middleware, error handlers and ``GET /metrics``."""
    app = FastAPI(title=title, version=__version__, description=description, lifespan=lifespan)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=max_body_bytes)
    install_error_handlers(app)
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    return app
