"""Pipeline fan-out semantics: both stages overlap; a failure cancels the sibling."""

from __future__ import annotations

import asyncio

import pytest

from gainrag.concurrency import gather_or_cancel
from gainrag.config import Settings
from gainrag.errors import UpstreamError
from gainrag.pipeline import Components, Pipeline


async def test_both_results_in_order() -> None:
    async def slow(x: int, d: float) -> int:
        await asyncio.sleep(d)
        return x

    assert await gather_or_cancel(slow(0, 0.05), slow(2, 0.0)) == (0, 2)


async def test_both_run_concurrently() -> None:
    # Each waits for the other to have started: in sequence this would never finish.
    started = [asyncio.Event(), asyncio.Event()]

    async def rendezvous(me: int) -> int:
        started[me].set()
        await started[1 - me].wait()
        return me

    assert await asyncio.wait_for(gather_or_cancel(rendezvous(0), rendezvous(1)), 5) == (0, 1)


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


class _Recorder:
    """Wraps a real component and logs when its calls start and end (no timings involved)."""

    def __init__(self, inner: object, method: str, log: list[str], label: str) -> None:
        self._inner, self._method, self._log, self._label = inner, method, log, label

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def wrapped(*args: object, **kwargs: object) -> object:
            self._log.append(f"{self._label}:start")
            try:
                return await attr(*args, **kwargs)
            finally:
                self._log.append(f"{self._label}:end")

        return wrapped


async def test_retrieval_and_pseudo_passage_overlap_on_real_models(
    settings: Settings, components: Components
) -> None:
    # Both stages must start before either ends: ordering, not a clock, so it holds under any load.
    events: list[str] = []
    generator = _Recorder(components.generator, "chat", events, "llm")
    retriever = _Recorder(components.retriever, "retrieve", events, "retrieve")
    pipe = Pipeline(
        settings,
        Components(retriever, components.selector, generator),  # type: ignore[arg-type]
    )
    result = await pipe.answer("who got the first nobel prize in physics")
    assert result.answer
    # the first llm call is the pseudo-passage, the second the answer
    first_end = min(events.index("retrieve:end"), events.index("llm:end"))
    assert {"retrieve:start", "llm:start"} <= set(events[:first_end])
    assert events[-2:] == ["llm:start", "llm:end"]
