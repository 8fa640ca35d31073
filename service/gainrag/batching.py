"""Dynamic batching of concurrent requests onto one model thread.

Requests queue up; one loop takes the oldest, then keeps adding compatible requests (same key)
until the cost budget is met or the oldest has waited ``max_wait_s``, and runs the whole batch in
the model's single worker thread. While a batch runs, new requests accumulate, so under load
batches fill without waiting (continuous batching in the style of text-embeddings-inference).
A full queue rejects with :class:`OverloadedError`; requests whose caller went away are dropped
before they reach the model.

No request can fail another: when a batch raises, it is bisected and the halves rerun, so the
callers whose items run fine get their normal results and only the item that fails on its own
gets an error - a 422 (:class:`ValidationFailedError`, code ``unprocessable_input``), since its
input is what the model cannot take. When every item fails on its own too, the model itself is
broken and every caller gets the batch's error (a dependency failure upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import context as otel_context

from gainrag import telemetry, tracing
from gainrag.errors import GainRAGError, OverloadedError, ValidationFailedError
from gainrag.logs import request_id_var

I = TypeVar("I")  # noqa: E741 - the conventional name for an input type variable
O = TypeVar("O")  # noqa: E741

log = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[I, O]):
    item: I
    cost: int
    key: Hashable
    future: asyncio.Future[O]
    enqueued: float = field(default_factory=time.monotonic)
    # The submitter's request id: the loop logs about this item under it, not under whichever
    # request happened to start the loop.
    request_id: str | None = field(default_factory=request_id_var.get)
    # and its trace context: the queue wait is a span of the submitter's trace
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass
class BatchStats:
    """Counters a test or a metrics exporter can read."""

    batches: int = 0
    items: int = 0
    dropped: int = 0
    rejected: int = 0
    isolated: int = 0  # items that failed alone after their batch failed (bad input)
    retries: int = 0  # extra model calls made to isolate failing items
    last_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))


class MicroBatcher(Generic[I, O]):
    """Batch concurrent ``submit`` calls into ``run_batch`` calls on one worker thread.

    ``run_batch`` returns one result per item, in order; an item's result may be an exception
    instance, which is raised to that caller only (e.g. one prompt too long in a batch).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[I]], Sequence[O | BaseException]],
        *,
        max_batch_cost: int,
        max_wait_s: float,
        max_queue: int,
        cost: Callable[[I], int] = lambda _item: 1,
        key: Callable[[I], Hashable] = lambda _item: None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._max_cost = max_batch_cost
        self._max_wait = max_wait_s
        self._max_queue = max_queue
        self._cost = cost
        self._key = key
        self._queue: deque[_Pending[I, O]] = deque()
        self._current: list[_Pending[I, O]] = []  # the batch being filled or run
        self._wakeup = asyncio.Event()
        # One thread per model: torch already parallelises inside an op, and one thread keeps
        # the batches strictly sequential so memory and latency stay predictable.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = BatchStats()
        self._m_queue = telemetry.BATCH_QUEUE.labels(name)
        self._m_requests = telemetry.BATCH_REQUESTS.labels(name)
        self._m_cost = telemetry.BATCH_COST.labels(name)
        self._m_rejected = telemetry.BATCH_REJECTED.labels(name)
        self._m_dropped = telemetry.BATCH_DROPPED.labels(name)

    @property
    def queue_size(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._queue)

    def start(self) -> None:
        """Start (or restart) the batching loop on the running event loop; idempotent."""
        if self._task is None or self._task.done():
            # A fresh context: the loop outlives the request that started it, and must not log
            # every later batch under that request's id.
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=self.name, context=contextvars.Context()
            )

    async def close(self) -> None:
        """Stop the loop, fail queued and in-flight requests, release the worker thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_all(OverloadedError(f"{self.name} is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _fail_all(self, exc: BaseException) -> None:
        for p in [*self._current, *self._queue]:
            if not p.future.done():
                p.future.set_exception(exc)
        self._current = []
        self._queue.clear()
        self._queue_changed()

    def _queue_changed(self) -> None:
        # Called on every change, so an idle server never shows a stale queue (e.g. after
        # cancelled requests were dropped).
        self._m_queue.set(len(self._queue))

    async def submit(self, item: I) -> O:
        """Queue one request and wait for its own result."""
        if self._closed:
            raise OverloadedError(f"{self.name} is shutting down")
        self.start()
        if len(self._queue) >= self._max_queue:
            # Callers that gave up must not hold places: prune them before refusing anyone.
            self._queue = deque(p for p in self._queue if not p.future.done())
            self._queue_changed()
            if len(self._queue) >= self._max_queue:
                self.stats.rejected += 1
                self._m_rejected.inc()
                raise OverloadedError(
                    f"{self.name} queue is full ({self._max_queue} waiting); retry shortly"
                )
        fut: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, max(1, self._cost(item)), self._key(item), fut))
        self._queue_changed()
        self._wakeup.set()
        return await fut

    def _count_dropped(self, n: int = 1) -> None:
        self.stats.dropped += n
        self._m_dropped.inc(n)

    def _pop_live(self) -> _Pending[I, O] | None:
        try:
            while self._queue:
                p = self._queue.popleft()
                if p.future.done():  # caller cancelled (client went away)
                    self._count_dropped()
                    continue
                return p
            return None
        finally:
            self._queue_changed()

    def _take_compatible(self, batch: list[_Pending[I, O]], budget: int) -> int:
        """Move queued requests with the batch's key into it while they fit the budget."""
        key = batch[0].key
        kept: deque[_Pending[I, O]] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():
                self._count_dropped()
            elif p.key == key and p.cost <= budget:
                batch.append(p)
                budget -= p.cost
            else:
                kept.append(p)
                if p.key == key:
                    break  # FIFO within a key: do not let later small requests overtake it
        kept.extend(self._queue)
        self._queue = kept
        self._queue_changed()
        return budget

    async def _loop(self) -> None:
        try:
            while True:
                await self._one_batch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the loop itself: fail callers, do not hang them
            log.exception("batch loop of %s died", self.name)
            self._fail_all(exc)
            raise

    async def _one_batch(self) -> None:
        first = self._pop_live()
        if first is None:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        batch = self._current = [first]
        budget = self._max_cost - first.cost
        deadline = first.enqueued + self._max_wait
        while budget > 0:
            budget = self._take_compatible(batch, budget)
            remaining = deadline - time.monotonic()
            if budget <= 0 or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                self._take_compatible(batch, budget)
                break
        live = [p for p in batch if not p.future.done()]
        if len(batch) > len(live):
            self._count_dropped(len(batch) - len(live))
        self._current = live
        if not live:
            return
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.last_batch_sizes.append(len(live))
        self._m_requests.observe(len(live))
        cost = sum(p.cost for p in live)
        self._m_cost.observe(cost)
        if tracing.enabled():  # (per item, wait_span skips traces that are not recorded)
            attributes = {"gainrag.batch.size": len(live), "gainrag.batch.cost": cost}
            for p in live:
                tracing.wait_span(f"queue {self.name}", p.trace_context, p.enqueued, attributes)
        try:
            results = await self._call(live)
        except Exception as exc:
            await self._isolate(live, exc)
        else:
            self._deliver(live, results)
        self._current = []

    async def _call(self, items: list[_Pending[I, O]]) -> Sequence[O | BaseException]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            self._executor, self._run_batch, [p.item for p in items]
        )
        if len(results) != len(items):
            raise RuntimeError(
                f"{self.name}: batch of {len(items)} returned {len(results)} results"
            )
        return results

    @staticmethod
    def _deliver(items: list[_Pending[I, O]], results: Sequence[O | BaseException]) -> None:
        for p, r in zip(items, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    async def _isolate(self, items: list[_Pending[I, O]], batch_exc: Exception) -> None:
        """The batch raised: find the items that fail on their own; everyone else gets results."""
        failed: list[tuple[Exception, _Pending[I, O]]] = []
        ok = 0
        if len(items) > 1:
            failed, ok = await self._bisect(items)
        if ok == 0:
            # Nothing runs, alone or together (or a batch of one): the model is broken, not an
            # input. One traceback per batch; every caller gets the batch's error.
            log.error(
                "batch of %d failed in %s",
                len(items),
                self.name,
                exc_info=(type(batch_exc), batch_exc, batch_exc.__traceback__),
            )
            for p in items:
                if not p.future.done():
                    p.future.set_exception(batch_exc)
            return
        for exc, p in failed:
            self._reject_item(p, exc)

    async def _bisect(
        self, items: list[_Pending[I, O]]
    ) -> tuple[list[tuple[Exception, _Pending[I, O]]], int]:
        """Rerun each half of a failed batch, recursively; deliver what succeeds.

        Returns the items that failed alone (with their errors) and how many items succeeded.
        Bisection rather than one call per item: with one bad item in a batch of 8 the good
        ones still run batched (4 + 2 + 1) in log2(8) rounds.
        """
        failed: list[tuple[Exception, _Pending[I, O]]] = []
        ok = 0
        mid = len(items) // 2
        for half in (items[:mid], items[mid:]):
            live = [p for p in half if not p.future.done()]
            if len(live) < len(half):
                self._count_dropped(len(half) - len(live))
            if not live:
                continue
            self.stats.retries += 1
            try:
                results = await self._call(live)
            except Exception as exc:
                if len(live) == 1:
                    failed.append((exc, live[0]))
                    continue
                sub_failed, sub_ok = await self._bisect(live)
                failed.extend(sub_failed)
                ok += sub_ok
            else:
                self._deliver(live, results)
                ok += len(live)
        return failed, ok

    def _reject_item(self, p: _Pending[I, O], exc: BaseException) -> None:
        """The item failed alone while others in its batch ran: its input is the cause."""
        self.stats.isolated += 1
        if p.future.done():
            return
        # One line, no traceback: a bad input is the client's problem, not an incident.
        log.warning(
            "%s: one input failed alone and was rejected (%s)",
            self.name,
            type(exc).__name__,
            extra={"request_id": p.request_id},
        )
        if isinstance(exc, GainRAGError) and exc.status_code < 500:
            p.future.set_exception(exc)
            return
        err = ValidationFailedError(
            f"the {self.name} model could not process this input", code="unprocessable_input"
        )
        err.__cause__ = exc
        p.future.set_exception(err)
