"""MicroBatcher: batching across concurrent callers, budgets, keys, overload, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gainrag.batching import MicroBatcher
from gainrag.errors import OverloadedError


async def test_concurrent_calls_share_batches_and_get_their_own_results() -> None:
    seen: list[list[int]] = []

    def run(items: list[list[int]]) -> list[int]:
        seen.append([len(x) for x in items])
        return [sum(x) for x in items]

    b: MicroBatcher[list[int], int] = MicroBatcher(
        "t", run, max_batch_cost=10, max_wait_s=0.05, max_queue=100, cost=len
    )
    inputs = [[i] * 3 for i in range(6)]  # cost 3 each -> at most 3 per batch (budget 10)
    results = await asyncio.gather(*(b.submit(x) for x in inputs))
    assert results == [3 * i for i in range(6)]
    assert all(sum(sizes) <= 10 for sizes in seen)
    assert b.stats.batches == len(seen) < len(inputs)
    assert b.stats.items == 6
    await b.close()


async def test_oversized_request_runs_alone() -> None:
    b: MicroBatcher[list[int], int] = MicroBatcher(
        "t",
        lambda items: [len(x) for x in items],
        max_batch_cost=4,
        max_wait_s=0.0,
        max_queue=10,
        cost=len,
    )
    assert await b.submit(list(range(50))) == 50
    await b.close()


async def test_keys_are_never_mixed_in_one_batch() -> None:
    batches: list[set[int]] = []

    def run(items: list[tuple[str, int]]) -> list[str]:
        batches.append({k for _, k in items})
        return [f"{s}:{k}" for s, k in items]

    b: MicroBatcher[tuple[str, int], str] = MicroBatcher(
        "t", run, max_batch_cost=8, max_wait_s=0.02, max_queue=100, key=lambda it: it[1]
    )
    items = [(str(i), i % 2) for i in range(8)]
    out = await asyncio.gather(*(b.submit(it) for it in items))
    assert out == [f"{i}:{i % 2}" for i in range(8)]
    assert all(len(keys) == 1 for keys in batches)
    await b.close()


async def test_full_queue_rejects_with_overloaded() -> None:
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=1, max_wait_s=0.0, max_queue=2
    )
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.05)  # the first batch is now running (blocked on the gate)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError):
        await b.submit(3)
    assert b.stats.rejected == 1
    gate.set()
    assert await asyncio.gather(first, *queued) == [0, 1, 2]
    await b.close()


async def test_cancelled_callers_are_dropped_before_the_model_runs() -> None:
    gate = threading.Event()
    ran: list[int] = []

    def run(items: list[int]) -> list[int]:
        gate.wait(5)
        ran.extend(items)
        return items

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=1, max_wait_s=0.0, max_queue=10
    )
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(b.submit(1))
    kept = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client went away while queued
    gate.set()
    assert await first == 0 and await kept == 2
    assert ran == [0, 2]
    assert b.stats.dropped == 1
    await b.close()


async def test_model_failure_reaches_every_caller_in_the_batch() -> None:
    def run(items: list[int]) -> list[int]:
        raise RuntimeError("boom")

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.02, max_queue=10
    )
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await asyncio.gather(b.submit(1), return_exceptions=True)  # still serving
    await b.close()
