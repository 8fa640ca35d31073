"""Cancel a request's work when its client goes away (the gateway and both workers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from gainrag.errors import ClientClosedError

T = TypeVar("T")


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away (read the body first)."""
    # After the body is read, the next ASGI message is http.disconnect: the client went away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client disconnects first, in which case cancel it.

    Starlette does not cancel a handler whose client left; without this, abandoned requests would
    keep the models busy until their deadline.
    """
    work = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    raise ClientClosedError("client disconnected; the request was cancelled")
