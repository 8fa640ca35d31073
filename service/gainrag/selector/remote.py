"""Client of the selector worker (``gainrag worker selector``), vLLM/Jina ``/rerank`` shape."""

from __future__ import annotations

import math

from pydantic import ValidationError

from gainrag.selector.wire import RerankRequest, RerankScores
from gainrag.types import Passage
from gainrag.upstream import WorkerClient, malformed, off_model


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
        request = RerankRequest(query=question, documents=docs)
        # Only the fields set: the optional ones keep the server's defaults.
        body = await self.upstream.request(
            "POST", "/rerank", request.model_dump(exclude_defaults=True)
        )
        try:
            reply = RerankScores.model_validate(body)
        except ValidationError as exc:
            raise off_model("selector", exc) from exc
        scores = [math.nan] * len(docs)
        try:
            for r in reply.results:
                scores[r.index] = r.relevance_score
        except IndexError as exc:
            raise malformed("selector", f"IndexError: {exc}") from exc
        if reply.model_version is not None:
            self.version = reply.model_version
        if any(math.isnan(s) for s in scores):
            raise malformed("selector", "not every document was scored")
        return scores
