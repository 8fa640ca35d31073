"""The cache as the pipeline sees it: the :class:`CacheStore` interface and the key function.

Keys hash the question exactly as the models see it (NFC and stripped by
:mod:`gainrag.textcheck`, nothing else) with every version that changes the result (index, selector,
generator, prompts, top_n, k, the pipeline switches and generation budgets). The Redis store is
:class:`gainrag.cache.Cache`; tests use in-memory ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol


def cache_key(kind: str, question: str, versions: dict[str, Any]) -> str:
    """``<kind>:<sha256>`` of the question text and the versions (order-independent).

    The text is hashed as given, never re-normalised: two requests share an entry only when the
    model got the same prompt for both, so no spelling variant can fill the entry that another
    spelling is then served (case or a trailing '?' can change a greedy generation).
    """
    blob = json.dumps({"q": question, "v": versions}, sort_keys=True, ensure_ascii=False)
    return f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()}"


class CacheStore(Protocol):
    """JSON values by ``kind`` (answer, pseudo) and key; a failure is a miss, never an error."""

    async def get(self, kind: str, key: str) -> Any | None:
        """The cached value, or None."""
        ...

    async def set(self, kind: str, key: str, value: Any) -> None:
        """Store a value (best effort)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
