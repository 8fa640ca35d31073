"""Small asyncio helpers shared by the pipeline and the servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


async def gather_or_cancel(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Run two awaitables concurrently; if one fails, cancel the other before raising.

    (``asyncio.gather`` would leave the sibling running, e.g. an LLM generation for a request
    that has already failed, using capacity that the in-flight limit no longer accounts for.)
    """
    t1, t2 = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        await asyncio.wait((t1, t2), return_when=asyncio.FIRST_EXCEPTION)
    finally:  # also when this request itself is cancelled (deadline, client gone)
        for t in (t1, t2):
            if not t.done():
                t.cancel()
    for t in (t1, t2):  # raise the real failure, not the sibling's cancellation
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return t1.result(), t2.result()
