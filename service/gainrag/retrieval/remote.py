"""Client of the retrieval worker (``gainrag worker retrieval``): same interface as in-process."""

from __future__ import annotations

from typing import Any

from gainrag.remote import Upstream, make_client, malformed
from gainrag.types import Passage, Retrieved


class RemoteRetriever:
    """``POST /retrieve`` on a retrieval worker."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_retries: int = 2) -> None:
        self.upstream = Upstream(
            "retriever", make_client(base_url, timeout_s=timeout_s), connect_retries=connect_retries
        )
        # Learned from the worker (/ready at start-up, then every response): an index hot swap
        # on the worker changes the version, and so the gateway's cache keys, without a restart.
        self.name = "remote-retriever"
        self.version = "unknown"

    async def refresh(self) -> None:
        """Read the worker's model names and index version from its /ready."""
        body = await self.upstream.request("GET", "/ready")
        models = body.get("models")
        if isinstance(models, dict):
            self.name = str(models.get("retriever", self.name))
            self.version = str(models.get("index_version", self.version))

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

    async def close(self) -> None:
        """Close the connection pool."""
        await self.upstream.close()
