"""Pipeline fan-out semantics: both stages overlap; a failure cancels the sibling."""

from __future__ import annotations

import asyncio

import pytest

from gainrag.errors import UpstreamError
from gainrag.pipeline import gather_or_cancel


async def test_both_results_in_order() -> None:
    async def slow(x: int, d: float) -> int:
        await asyncio.sleep(d)
        return x

    loop = asyncio.get_running_loop()
    t = loop.time()
    assert await gather_or_cancel(slow(1, 0.2), slow(2, 0.2)) == (1, 2)
    assert loop.time() - t < 0.35  # concurrent, not 0.4 s in sequence


@pytest.mark.parametrize("failing_first", [True, False])
async def test_failure_cancels_the_sibling_and_raises_the_real_error(failing_first: bool) -> None:
    cancelled = asyncio.Event()

    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise UpstreamError("retrieval down")

    async def long_running() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    pair = (fails(), long_running()) if failing_first else (long_running(), fails())
    with pytest.raises(UpstreamError, match="retrieval down"):
        await gather_or_cancel(*pair)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_cancelling_the_caller_cancels_both() -> None:
    cancelled = 0

    async def long_running() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    task = asyncio.ensure_future(gather_or_cancel(long_running(), long_running()))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert cancelled == 2
