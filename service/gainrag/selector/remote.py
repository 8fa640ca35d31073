"""Client of the selector worker (``gainrag worker selector``), vLLM/Jina ``/rerank`` shape."""

from __future__ import annotations

import math

from gainrag.remote import Upstream, make_client, malformed
from gainrag.types import Passage


class RemoteSelector:
    """Scores candidates with ``POST /rerank`` on a selector worker."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_retries: int = 2) -> None:
        self.upstream = Upstream(
            "selector", make_client(base_url, timeout_s=timeout_s), connect_retries=connect_retries
        )
        self.name = "remote-selector"
        self.version = "unknown"

    async def refresh(self) -> None:
        """Read the worker's model name and checkpoint version from its /ready."""
        body = await self.upstream.request("GET", "/ready")
        models = body.get("models")
        if isinstance(models, dict):
            self.name = str(models.get("selector", self.name))
            self.version = str(models.get("selector_version", self.version))

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        """One score per candidate, in the candidates' order."""
        if not candidates:
            return []
        docs = [c.as_candidate_text() for c in candidates]
        body = await self.upstream.request(
            "POST", "/rerank", {"query": question, "documents": docs}
        )
        scores = [math.nan] * len(docs)
        try:
            for r in body["results"]:
                scores[int(r["index"])] = float(r["relevance_score"])
            if isinstance(body.get("model_version"), str):
                self.version = body["model_version"]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise malformed("selector", f"{type(exc).__name__}: {exc}") from exc
        if any(math.isnan(s) for s in scores):
            raise malformed("selector", "not every document was scored")
        return scores

    async def close(self) -> None:
        """Close the connection pool."""
        await self.upstream.close()
