"""MicroBatcher: batching across concurrent callers, budgets, keys, overload, cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from gainrag.batching import MicroBatcher
from gainrag.errors import OverloadedError, ValidationFailedError
from gainrag.logs import JsonFormatter, request_id_var


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
    broken = True  # fails whatever the input (alone too): the model, not a request, is at fault

    def run(items: list[int]) -> list[int]:
        if broken:
            raise RuntimeError("boom")
        return [x * 10 for x in items]

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.02, max_queue=10
    )
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 3
    broken = False
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


def _crashes_on_negative(calls: list[list[int]]) -> Callable[[list[int]], list[int]]:
    """A model whose whole batch crashes on one bad input (like a tokenizer on a lone surrogate)."""

    def run(items: list[int]) -> list[int]:
        calls.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError("cannot tokenize")
        return [x * 10 for x in items]

    return run


async def _submit_together(b: MicroBatcher[int, int], items: list[int]) -> list[object]:
    return await asyncio.gather(*(b.submit(x) for x in items), return_exceptions=True)


@pytest.mark.parametrize("bad_at", [0, 3, 7])
async def test_a_bad_item_fails_alone_and_the_others_get_their_results(
    bad_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[list[int]] = []
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", _crashes_on_negative(calls), max_batch_cost=8, max_wait_s=0.2, max_queue=10
    )
    items = [i + 1 for i in range(8)]
    items[bad_at] = -1
    with caplog.at_level(logging.WARNING, logger="gainrag.batching"):
        results = await _submit_together(b, items)
    assert calls[0] == items  # one batch that crashed, then bisected
    for i, r in enumerate(results):
        if i == bad_at:
            assert isinstance(r, ValidationFailedError) and r.code == "unprocessable_input"
            assert r.status_code == 422
        else:
            assert r == items[i] * 10
    assert b.stats.isolated == 1
    assert len(calls) <= 1 + 2 * 3  # bisection: at most two calls per halving round
    # One concise warning, no traceback, no error line.
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].exc_info is None
    await b.close()


async def test_several_bad_items_fail_alone() -> None:
    calls: list[list[int]] = []
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", _crashes_on_negative(calls), max_batch_cost=8, max_wait_s=0.2, max_queue=10
    )
    results = await _submit_together(b, [1, -1, 2, -2, 3])
    assert [r if isinstance(r, int) else "bad" for r in results] == [10, "bad", 20, "bad", 30]
    assert b.stats.isolated == 2
    await b.close()


async def test_a_4xx_raised_by_the_model_for_one_item_reaches_it_unchanged() -> None:
    def run(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValidationFailedError("too long", code="prompt_too_long")
        return items

    b: MicroBatcher[int, int] = MicroBatcher(
        "t", run, max_batch_cost=4, max_wait_s=0.1, max_queue=10
    )
    good, bad = await _submit_together(b, [5, -1])
    assert good == 5
    assert isinstance(bad, ValidationFailedError) and bad.code == "prompt_too_long"
    await b.close()


async def test_queue_gauge_is_zero_on_an_idle_server_after_dropped_requests() -> None:
    model = Gated()
    b: MicroBatcher[int, int] = MicroBatcher(
        "gauge-t", model.run, max_batch_cost=1, max_wait_s=0.0, max_queue=10
    )

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("gainrag_batch_queue_size", {"batcher": "gauge-t"})

    first = asyncio.ensure_future(b.submit(0))
    await until(model.entered.is_set)
    gone = [asyncio.ensure_future(b.submit(i)) for i in range(1, 5)]
    await until(lambda: b.queue_size == 4)
    assert gauge() == 4
    for g in gone:
        g.cancel()
    model.gate.set()
    assert await first == 0
    await until(lambda: b.queue_size == 0 and b.stats.dropped == 4)
    await asyncio.sleep(0.01)  # the loop is idle again
    assert gauge() == 0
    await b.close()


async def test_batch_loop_logs_carry_the_items_request_id_not_the_loop_starters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[int]] = []
    b: MicroBatcher[int, int] = MicroBatcher(
        "t", _crashes_on_negative(calls), max_batch_cost=4, max_wait_s=0.1, max_queue=10
    )
    formatter = JsonFormatter()

    async def as_request(rid: str, item: int) -> object:
        request_id_var.set(rid)  # each task has its own context copy
        try:
            return await b.submit(item)
        except Exception as exc:
            return exc

    # The first request starts the batch loop.
    assert await asyncio.create_task(as_request("starter", 1)) == 10
    with caplog.at_level(logging.WARNING, logger="gainrag.batching"):
        await asyncio.gather(as_request("good", 2), as_request("bad", -1))
        lines = [json.loads(formatter.format(r)) for r in caplog.records]
        assert [line.get("request_id") for line in lines] == ["bad"]
        caplog.clear()
        # A model failure affects the whole batch: its error line names no single request.
        await asyncio.gather(as_request("bad-1", -1), as_request("bad-2", -2))
        lines = [json.loads(formatter.format(r)) for r in caplog.records]
    assert [line["level"] for line in lines] == ["ERROR"]
    assert "request_id" not in lines[0]
    await b.close()
