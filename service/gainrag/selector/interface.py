"""The selector interface."""

from __future__ import annotations

from typing import Protocol

from gainrag.types import Passage


class Selector(Protocol):
    """Scores every candidate for a question in one call; higher is better."""

    name: str
    version: str

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        """One score per candidate, in the candidates' order."""
        ...

    async def close(self) -> None:
        """Release threads and models."""
        ...
