"""MicroBatcher: batching across concurrent callers, budgets, keys, overload, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from gainrag.batching import MicroBatcher
from gainrag.errors import OverloadedError


class Gated:
    """A model whose batches block until the test opens the gate (to hold the queue still)."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.ran: list[int] = []

    def run(self, items: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(5)
        self.ran.extend(items)
        return items


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the loop until cond() holds: waits on states, not on how fast the machine is."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


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
    model = Gated()
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", model.run, max_batch_cost=1, max_wait_s=0.0, max_queue=2
    )
    first = asyncio.ensure_future(b.submit(0))
    await until(model.entered.is_set)  # the first batch is now running (blocked on the gate)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await until(lambda: b.queue_size == 2)
    with pytest.raises(OverloadedError):
        await b.submit(3)
    assert b.stats.rejected == 1
    model.gate.set()
    assert await asyncio.gather(first, *queued) == [0, 1, 2]
    await b.close()


async def test_cancelled_callers_are_dropped_before_the_model_runs() -> None:
    model = Gated()
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", model.run, max_batch_cost=1, max_wait_s=0.0, max_queue=10
    )
    first = asyncio.ensure_future(b.submit(0))
    await until(model.entered.is_set)
    gone = asyncio.ensure_future(b.submit(1))
    kept = asyncio.ensure_future(b.submit(2))
    await until(lambda: b.queue_size == 2)
    gone.cancel()  # the client went away while queued
    model.gate.set()
    assert await first == 0 and await kept == 2
    assert model.ran == [0, 2]
    assert b.stats.dropped == 1
    await b.close()


async def test_model_failure_reaches_every_caller_in_the_batch() -> None:
    calls = 0

    def run(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return [x * 10 for x in items]

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.02, max_queue=10
    )
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert await b.submit(7) == 70  # the loop survived and still serves
    await b.close()


async def test_wrong_result_count_fails_the_batch_not_the_loop() -> None:
    short = True

    def run(items: list[int]) -> list[int]:
        return items[:-1] if short else items

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.02, max_queue=10
    )
    results = await asyncio.gather(*(b.submit(i) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "returned 1 results" in str(r) for r in results)
    short = False
    assert await asyncio.wait_for(b.submit(5), 5) == 5
    await b.close()


async def test_per_item_exceptions_reach_only_their_caller() -> None:
    def run(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.05, max_queue=10
    )
    good, bad = await asyncio.gather(b.submit(3), b.submit(-1), return_exceptions=True)
    assert good == 3
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert b.stats.batches == 1
    await b.close()


async def test_close_fails_in_flight_and_later_requests() -> None:
    model = Gated()
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", model.run, max_batch_cost=1, max_wait_s=0.0, max_queue=10
    )
    running = asyncio.ensure_future(b.submit(0))
    await until(model.entered.is_set)
    queued = asyncio.ensure_future(b.submit(1))
    await until(lambda: b.queue_size == 1)
    await b.close()
    model.gate.set()
    for fut in (running, queued):
        with pytest.raises(OverloadedError, match="shutting down"):
            await asyncio.wait_for(fut, 5)
    with pytest.raises(OverloadedError, match="shutting down"):
        await b.submit(2)
