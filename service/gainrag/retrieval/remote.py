"""Client of the retrieval worker (``gainrag worker retrieval``): same interface as in-process."""

from __future__ import annotations

from typing import Any

from gainrag.types import Passage, Retrieved
from gainrag.upstream import WorkerClient, malformed


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
        body = await self.upstream.request("POST", "/retrieve", {"queries": [question], "k": k})
        return self._parse(body)[0]

    def _parse(self, body: dict[str, Any]) -> list[list[Retrieved]]:
        try:
            if "index_version" in body:
                self.version = str(body["index_version"])
            return [
                [
                    Retrieved(
                        Passage(str(h["id"]), str(h["title"]), str(h["text"])),
                        rank,
                        float(h["score"]),
                    )
                    for rank, h in enumerate(hits)
                ]
                for hits in body["results"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("retriever", f"{type(exc).__name__}: {exc}") from exc
