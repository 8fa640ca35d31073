"""Client of the selector worker (``gainrag worker selector``), vLLM/Jina ``/rerank`` shape."""

from __future__ import annotations

import math

from gainrag.types import Passage
from gainrag.upstream import WorkerClient, malformed


class RemoteSelector(WorkerClient):
    """Scores candidates with ``POST /rerank`` on a selector worker."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_retries: int = 2,
        token: str | None = None,
    ) -> None:
        super().__init__(
            "selector",
            base_url,
            timeout_s=timeout_s,
            connect_retries=connect_retries,
            name_key="selector",
            token=token,
            version_key="selector_version",
        )

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
