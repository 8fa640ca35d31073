"""The retriever interface (in-process now; a remote worker client implements the same)."""

from __future__ import annotations

from typing import Protocol

from gainrag.types import Retrieved


class Retriever(Protocol):
    """Returns the top-k passages for a question."""

    name: str
    version: str

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        """Best first."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...
