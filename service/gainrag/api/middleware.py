"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware): request ids, a body size limit and
the request latency histogram."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gainrag import metrics
from gainrag.logs import request_id_var

log = logging.getLogger(__name__)
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


_QUIET = {"/metrics", "/health", "/ready"}  # probes and scrapes would drown the access log


def _route_label(scope: Scope) -> str:
    # The route template, never the raw path: unmatched paths would explode label cardinality.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    """Assign/propagate ``X-Request-ID``, reject bodies over ``max_body_bytes`` with 413 and
    observe ``gainrag_http_request_seconds{route, method, status}``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._message = f"request body is over the {max_body_bytes}-byte limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                status = 413
                await self._reject(send, rid)
                return
            seen = 0

            async def limited_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body_bytes:
                        # FastAPI passes HTTPException through body parsing; its handler
                        # renders the standard error shape.
                        raise HTTPException(413, self._message)
                return message

            started = False

            async def send_with_id(message: Message) -> None:
                nonlocal started, status
                if message["type"] == "http.response.start":
                    started = True
                    status = int(message["status"])
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", rid.encode()),
                    ]
                await send(message)

            try:
                await self.app(scope, limited_receive, send_with_id)
            except Exception:
                # Handled here, inside the request context, so the 500 carries the request id
                # (FastAPI's outermost ServerErrorMiddleware would send it without).
                log.exception("unhandled error")
                if started:
                    raise
                await self._send_error(
                    send,
                    rid,
                    500,
                    f"internal error (request id {rid})",
                    "internal_error",
                    "internal_error",
                )
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            metrics.HTTP_SECONDS.labels(route, scope["method"], str(status)).observe(elapsed)
            if route not in _QUIET:  # the access log, with the request id of the line
                log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)

    async def _reject(self, send: Send, rid: str) -> None:
        await self._send_error(
            send, rid, 413, self._message, "invalid_request_error", "payload_too_large"
        )

    @staticmethod
    async def _send_error(
        send: Send, rid: str, status: int, message: str, type_: str, code: str
    ) -> None:
        body: dict[str, Any] = {"error": {"message": message, "type": type_, "code": code}}
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
