"""Streamed answers over Server-Sent Events, shared by ``/answer`` and ``/v1/chat/completions``.

:meth:`AnswerStream.open` runs everything that can still fail with a status code before the
response starts: the admission slot (429/503) and the pipeline up to selection (its 502/503/504),
so the first byte sent is the citation. After that, failures travel as events (the route's
format), and a client that disconnects cancels the pipeline's step in progress and closes the
generator's stream, which stops the decoding (in-process engine or the LLM server); the slot is
released either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from starlette.requests import Request

from gainrag import telemetry
from gainrag.api.auth import Principal
from gainrag.api.cancel import wait_for_disconnect
from gainrag.api.state import AppState
from gainrag.errors import ClientClosedError, GainRAGError
from gainrag.pipeline import CheckedQuery, Context, StreamEvent
from gainrag.types import AnswerResult

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx and similar proxies must not buffer the events
}


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def error_body(exc: BaseException) -> dict[str, Any]:
    """The error shape for a failure after the first byte (never ``str`` of an unexpected one)."""
    if isinstance(exc, GainRAGError):
        return {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}
    return {
        "error": {"message": "internal error", "type": "internal_error", "code": "internal_error"}
    }


async def _step(
    events: AsyncIterator[StreamEvent], left: asyncio.Future[None]
) -> StreamEvent | None:
    """The next event, None at the end; ClientClosedError if the client left first (the step is
    cancelled and awaited, so the pipeline's iterator can then be closed)."""
    step = asyncio.ensure_future(anext(events))
    try:
        await asyncio.wait((step, left), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the response itself is cancelled
        if not step.done():
            step.cancel()
            # Shielded: anyio re-delivers a cancellation at every await of a cancelled scope,
            # and the step must be over before the pipeline's iterator can be closed.
            with (
                anyio.CancelScope(shield=True),
                contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception),
            ):
                await step
    if step.cancelled():
        raise ClientClosedError("client disconnected; the request was cancelled")
    try:
        return step.result()
    except StopAsyncIteration:
        return None


class AnswerStream:
    """One streamed answer: its admission slot, the pipeline's events, the client's connection."""

    def __init__(
        self,
        stack: AsyncExitStack,
        context: Context,
        events: AsyncGenerator[StreamEvent, None],
        left: asyncio.Future[None],
        on_result: Callable[[AnswerResult], None] | None = None,
    ) -> None:
        self._stack = stack
        self.context = context
        self._events = events
        self._left = left
        self._on_result = on_result

    @classmethod
    async def open(
        cls,
        request: Request,
        state: AppState,
        principal: Principal,
        route: str,
        checked: CheckedQuery,
        *,
        use_cache: bool,
        on_result: Callable[[AnswerResult], None] | None = None,
    ) -> AnswerStream:
        """Take a slot and run the pipeline to its context; raises like the non-streaming path.
        ``on_result`` sees the finished answer before the route's last event is sent."""
        pipeline = state.require_pipeline()
        stack = AsyncExitStack()
        await stack.enter_async_context(state.admission.slot(principal, route))
        try:
            left = asyncio.ensure_future(wait_for_disconnect(request))
            stack.callback(left.cancel)
            events = pipeline.answer_stream(checked, use_cache=use_cache)
            stack.push_async_callback(events.aclose)  # runs before the slot is released
            first = await _step(events, left)
            if not isinstance(first, Context):
                raise RuntimeError("the pipeline's stream did not start with its context")
        except BaseException:
            await stack.aclose()
            raise
        return cls(stack, first, events, left, on_result)

    async def rest(self) -> AsyncGenerator[str | object, None]:
        """The answer's deltas (``str``), then its ``AnswerResult``; ends early, quietly, if the
        client leaves. Errors propagate; the slot and the pipeline close in every case."""
        outcome = "error"
        try:
            while (event := await _step(self._events, self._left)) is not None:
                if self._on_result is not None and isinstance(event, AnswerResult):
                    self._on_result(event)
                yield event
            outcome = "complete"
        except ClientClosedError:
            outcome = "disconnected"
        except asyncio.CancelledError:
            # Starlette cancels the response when it sees the disconnect first (ASGI < 2.4).
            outcome = "disconnected"
            raise
        finally:
            telemetry.STREAMS.labels(outcome).inc()
            with anyio.CancelScope(shield=True):  # the slot and the decoding, whatever happens
                await self._stack.aclose()


async def guarded(
    body: AsyncIterator[bytes], on_error: Any, request_id: str | None = None
) -> AsyncIterator[bytes]:
    """Relay ``body``; an exception becomes ``on_error(exc)``'s bytes (the last event)."""
    try:
        async for chunk in body:
            yield chunk
    except Exception as exc:
        if not isinstance(exc, GainRAGError):
            log.exception("streamed response failed", extra={"request_id": request_id})
        else:
            log.warning("streamed response failed: %s (%s)", exc.message, exc.code)
        yield on_error(exc)
