"""The generator interface (one user message in, text out), shared by every LLM backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, runtime_checkable


class Generator(Protocol):
    """A chat LLM. Backends apply the model's chat template and decode greedily."""

    name: str
    version: str

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """Reply to one user message."""
        ...

    async def close(self) -> None:
        """Release threads, models and connections."""
        ...


@runtime_checkable
class StreamingGenerator(Generator, Protocol):
    """A generator that can also stream its reply (both shipped backends do).

    ``stream`` yields text deltas whose concatenation is exactly what ``chat`` returns for the
    same message and budget (greedy decoding, the same strip). Closing the iterator early (the
    consumer went away) stops the decoding of that reply, not only its delivery.
    """

    def stream(self, message: str, *, max_new_tokens: int) -> AsyncIterator[str]:
        """Reply to one user message as text deltas."""
        ...


async def stream_reply(
    generator: Generator, message: str, *, max_new_tokens: int
) -> AsyncGenerator[str, None]:
    """The reply of any generator as deltas: its own ``stream`` when it has one, else the whole
    ``chat`` reply as one delta (wrappers and stand-ins need not stream)."""
    if isinstance(generator, StreamingGenerator):
        agen = generator.stream(message, max_new_tokens=max_new_tokens)
        try:
            async for delta in agen:
                yield delta
        finally:
            # Close the backend's iterator now (not at garbage collection): that is what stops
            # the decoding when our consumer leaves.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    text = await generator.chat(message, max_new_tokens=max_new_tokens)
    if text:
        yield text


def prompt_tokens(generator: Generator, message: str) -> int | None:
    """Exact prompt length of ``message`` for ``generator``, or None when it cannot count locally.

    An optional capability (``prompt_tokens`` on the backend), so wrappers and stand-ins need not
    implement it.
    """
    count = getattr(generator, "prompt_tokens", None)
    if count is None:
        return None
    n = count(message)
    return None if n is None else int(n)
