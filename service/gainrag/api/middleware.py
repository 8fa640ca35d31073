"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware): request ids, a body size and time
limit, the drain count and the request latency histogram."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gainrag import telemetry, tracing
from gainrag.api.drain import Drain
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
    bodies slower than ``body_timeout_s`` with 408, count requests in flight for the drain (and
    ask clients to reconnect elsewhere while draining) and observe
    ``gainrag_http_request_seconds{route, method, status}``."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        drain: Drain | None = None,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # per path: the documents API takes files, /answer a question (exact paths only)
        self.body_limits = body_limits or {}
        self.body_timeout_s = body_timeout_s
        self.drain = drain or Drain()
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
        probe = scope["path"] in _QUIET
        drain = self.drain
        if not probe:  # probes and scrapes must not hold the drain open
            drain.active += 1
        limit = self.body_limits.get(scope["path"], self.max_body_bytes)
        message_413 = (
            self._message
            if limit == self.max_body_bytes
            else f"request body is over the {limit}-byte limit"
        )
        try:
            declared = headers.get(b"content-length")
            too_large = declared is not None and declared.isdigit() and int(declared) > limit
            seen = 0
            body_done = False
            deadline: float | None = None

            async def limited_receive() -> Message:
                nonlocal seen, body_done, deadline
                if too_large:
                    # Refused before a byte is read. Raised here rather than answered before the
                    # app runs, so the router has picked the route and the latency histogram gets
                    # its template; the connection is closed so the unread body is not swallowed.
                    raise HTTPException(413, message_413, headers={"connection": "close"})
                if body_done:  # after the body only http.disconnect comes: wait as long as it takes
                    return await receive()
                loop = asyncio.get_running_loop()
                if deadline is None:
                    deadline = loop.time() + self.body_timeout_s
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    # A client trickling its body would hold a slot and memory forever; close the
                    # connection, the rest of its body cannot be told from a next request.
                    raise HTTPException(
                        408, "request body not received in time", headers={"connection": "close"}
                    ) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if seen > limit:
                        # FastAPI passes HTTPException through body parsing; its handler
                        # renders the standard error shape.
                        raise HTTPException(413, message_413)
                return message

            started = False

            async def send_with_id(message: Message) -> None:
                nonlocal started, status
                if message["type"] == "http.response.start":
                    started = True
                    status = int(message["status"])
                    extra = [(b"x-request-id", rid.encode())]
                    trace_id = tracing.current_trace_id()
                    if trace_id is not None:  # the trace of this request, for the collector
                        extra.append((b"x-trace-id", trace_id.encode()))
                    if drain.draining:  # keep-alive clients reconnect to an instance that stays
                        extra.append((b"connection", b"close"))
                    message["headers"] = [*message.get("headers", []), *extra]
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
            if not probe:
                drain.active -= 1
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            telemetry.HTTP_SECONDS.labels(route, scope["method"], str(status)).observe(elapsed)
            if route not in _QUIET:  # the access log, with the request id of the line
                # The key's name, never the key: the Authorization header is not logged anywhere.
                who = scope["state"].get("principal", "-")
                log.info(
                    "%s %s %d %.1f ms key=%s",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed * 1000,
                    who,
                )
            request_id_var.reset(token)

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
