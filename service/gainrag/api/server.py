"""Running an app under uvicorn with connection limits and a graceful drain.

uvicorn (httptools) alone reads request headers without a size limit or a deadline and accepts
any number of connections: a client that sends a huge header slowly, or half a header and then
nothing, holds memory and a socket forever. :class:`GuardedHttpToolsProtocol` adds what is
missing, per connection:

- a cap on open connections (the one over it gets 503 and is closed before anything is read);
- a deadline for the request line and headers (408 and close), from the connection's opening or
  from the first byte of a later keep-alive request;
- a cap on header bytes and header lines (431 and close), enforced while the head is still
  arriving, so at most one read buffer past the limit is ever held.

The body deadline is enforced by :class:`~gainrag.api.middleware.RequestContextMiddleware`.
:class:`DrainingServer` turns the first SIGTERM/SIGINT into a drain (see :mod:`gainrag.api.drain`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gainrag import tracing
from gainrag.api.drain import Drain
from gainrag.config import HttpSettings

log = logging.getLogger(__name__)

# Stragglers still running when uvicorn's own shutdown starts (the drain deadline passed) get
# this long before they are cancelled.
_GRACEFUL_S = 2


def _status(code: int, reason: str, message: str) -> bytes:
    """A complete closing response in the service's error shape (written before any ASGI app)."""
    type_ = "unavailable_error" if code == 503 else "invalid_request_error"
    err = {"message": message, "type": type_, "code": reason.lower().replace(" ", "_")}
    data = json.dumps({"error": err}).encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n"
    )
    if code == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + data


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing (httptools reports it as a parser error)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpSettings` (see module doc)."""

    limits: HttpSettings = HttpSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0  # bytes received while the head is incomplete (an upper bound)
        self._head_size = 0  # exact: request target + header lines parsed so far
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._too_large: str | None = None  # why parsing was stopped with _HeadTooLarge
        self._body_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", "too many open connections; retry shortly")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "Request Header Fields Too Large", "request headers are too large")

    # Parser callbacks (httptools calls them from feed_data inside data_received).
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._body_done = False
        self._head_size = self._head_count = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = "request headers are too large"
        elif self._head_count > self.limits.max_headers:
            self._too_large = "too many request headers"
        if self._too_large is not None:
            raise _HeadTooLarge(self._too_large)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_done = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._body_done and not self.transport.is_closing():
            # Answered before its body was read: uvicorn discards the rest, and its keep-alive
            # timer restarts on every byte, so a client trickling that body would hold the
            # connection forever. The next head is due within the header timeout instead.
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error with 400; a limit we raised deserves its own status.
        if self._too_large is not None:
            self._refuse(431, "Request Header Fields Too Large", self._too_large)
            return
        super().send_400_response(msg)

    def _refuse(self, code: int, reason: str, message: str) -> None:
        if self.transport.is_closing():
            return
        self._cancel_head_timer()
        if code != 503:
            log.warning("%d: %s", code, message)
        self.transport.write(_status(code, reason, message))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        # Armed only while a head is due (and cancelled when one completes): always a timeout.
        self._head_timer = None
        self._refuse(408, "Request Timeout", "request headers not received in time")


def uvicorn_config(app: FastAPI, http: HttpSettings, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration of every gainrag server (gateway and workers)."""
    protocol = type("GainragHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": http})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",  # no WebSocket routes: do not accept upgrades
        log_config=None,  # keep our JSON logging
        access_log=False,  # RequestContextMiddleware writes the access log (with request ids)
        timeout_keep_alive=http.keep_alive_s,
        timeout_graceful_shutdown=_GRACEFUL_S,
        server_header=False,
    )


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains before exiting (a second exits now)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_s = drain_s
        self._deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.drain_s <= 0:
            super().handle_exit(sig, frame)
            return
        # Signal handler context: only flip flags; on_tick does the rest on the event loop.
        self.drain.begin()
        self._deadline = time.monotonic() + self.drain_s
        log.info(
            "%s: draining (up to %g s): /ready is 503, new requests are refused",
            signal.Signals(sig).name,
            self.drain_s,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self.drain.active == 0:
                log.info("drained: no request in flight; exiting")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                log.warning("drain deadline passed with %d request(s) in flight", self.drain.active)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, http: HttpSettings, *, host: str, port: int) -> None:
    """Run ``app`` until SIGTERM/SIGINT, then drain and exit."""
    drain: Drain = app.state.drain
    server = DrainingServer(uvicorn_config(app, http, host=host, port=port), drain, http.drain_s)
    try:
        server.run()
    finally:
        tracing.shutdown()  # flush the spans still in the exporter's batch
