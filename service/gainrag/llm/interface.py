"""The generator interface (one user message in, text out), shared by every LLM backend."""

from __future__ import annotations

from typing import Protocol


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


def generator_failure(generator: Generator) -> str | None:
    """Why ``generator`` cannot serve right now (e.g. the managed llama.cpp engine exited), or
    None. An optional capability (``failure`` on the backend); readiness reports it."""
    failure = getattr(generator, "failure", None)
    if failure is None:
        return None
    reason = failure()
    return None if reason is None else str(reason)
