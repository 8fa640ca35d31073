"""Client of the retrieval worker (``gainrag worker retrieval``): same interface as in-process."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gainrag.retrieval.wire import RetrieveRequest, RetrieveResponse
from gainrag.types import Passage, Retrieved
from gainrag.upstream import WorkerClient, malformed, off_model


class RemoteRetriever(WorkerClient):
    """``POST /retrieve`` on a retrieval worker."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_retries: int = 2,
        token: str | None = None,
    ) -> None:
        super().__init__(
            "retriever",
            base_url,
            timeout_s=timeout_s,
            connect_retries=connect_retries,
            name_key="retriever",
            token=token,
            version_key="index_version",
        )

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        """Top-k passages for one question, best first."""
        request = RetrieveRequest(queries=[question], k=k)
        body = await self.upstream.request("POST", "/retrieve", request.model_dump())
        results = self._parse(body)
        if len(results) != 1:
            raise malformed("retriever", f"{len(results)} result lists for one query")
        return results[0]

    def _parse(self, body: dict[str, Any]) -> list[list[Retrieved]]:
        try:
            reply = RetrieveResponse.model_validate(body)
        except ValidationError as exc:
            raise off_model("retriever", exc) from exc
        self.version = reply.index_version
        return [
            [
                Retrieved(Passage(h.id, h.title, h.text), rank, h.score)
                for rank, h in enumerate(hits)
            ]
            for hits in reply.results
        ]
