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
