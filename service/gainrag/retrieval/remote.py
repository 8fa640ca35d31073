"""Client of the retrieval worker (``gainrag worker retrieval``): same interface as in-process."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, ValidationError

from gainrag.retrieval.wire import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    DeleteDocumentResponse,
    DocumentOut,
    DocumentPage,
    RetrieveRequest,
    RetrieveResponse,
)
from gainrag.types import Passage, Retrieved
from gainrag.upstream import Upstream, WorkerClient, make_client, malformed, off_model

_M = TypeVar("_M", bound=BaseModel)


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
        self._stamp: tuple[int, str | None] | None = None  # (generation, store) of self.version

    def learn(self, version: str, generation: int | None, store: str | None) -> None:
        """Take the worker's index version, unless it is older than one already known of the
        same store: a search that started before a write answers after the write's response,
        and the cache keys must not go back to the version before it."""
        known = self._stamp
        if (
            generation is not None
            and known is not None
            and store == known[1]
            and generation < known[0]
        ):
            return
        self.version = version
        self._stamp = None if generation is None else (generation, store)

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
        self.learn(reply.index_version, reply.index_generation, reply.index_store)
        return [
            [
                Retrieved(Passage(h.id, h.title, h.text), rank, h.score)
                for rank, h in enumerate(hits)
            ]
            for hits in reply.results
        ]


class RemoteDocuments:
    """The documents API of a retrieval worker (``/v1/documents``): the gateway proxies to it
    when retrieval is split off. The worker's 4xx pass through with their status and code."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        token: str | None = None,
        retriever: RemoteRetriever | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else None
        # A write changes the worker's index version; the gateway's retriever client learns it
        # here at once, not at its next retrieval: cache keys hold that version, and without
        # this a question answered from the cache would keep hitting the pre-write answer.
        self.retriever = retriever
        # Upstream repeats a request once on a dropped connection: safe here too, a write is
        # idempotent (the same id and content is a no-op)
        self.upstream = Upstream(
            "retriever", make_client(base_url, timeout_s=timeout_s, headers=headers)
        )

    async def _call(
        self, method: str, path: str, model: type[_M], payload: dict[str, Any] | None = None
    ) -> _M:
        body = await self.upstream.request(method, path, payload, client_errors=True)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise off_model("retriever", exc) from exc

    async def add(self, body: AddDocumentsRequest) -> AddDocumentsResponse:
        """``POST /v1/documents`` on the worker."""
        out = await self._call(
            "POST", "/v1/documents", AddDocumentsResponse, body.model_dump(exclude_none=True)
        )
        self._learn(out.index_version, out.index_generation, out.index_store)
        return out

    def _learn(self, version: str, generation: int | None, store: str | None) -> None:
        if self.retriever is not None:
            self.retriever.learn(version, generation, store)

    async def get(self, doc_id: str) -> DocumentOut:
        """``GET /v1/documents/{id}`` on the worker."""
        return await self._call("GET", f"/v1/documents/{quote(doc_id, safe='')}", DocumentOut)

    async def list(self, *, collection: str | None, after: str | None, limit: int) -> DocumentPage:
        """``GET /v1/documents`` on the worker."""
        params = {"limit": str(limit)}
        if collection is not None:
            params["collection"] = collection
        if after is not None:
            params["after"] = after
        return await self._call("GET", f"/v1/documents?{urlencode(params)}", DocumentPage)

    async def delete(self, doc_id: str) -> DeleteDocumentResponse:
        """``DELETE /v1/documents/{id}`` on the worker."""
        out = await self._call(
            "DELETE", f"/v1/documents/{quote(doc_id, safe='')}", DeleteDocumentResponse
        )
        self._learn(out.index_version, out.index_generation, out.index_store)
        return out

    async def close(self) -> None:
        """Close the connection pool."""
        await self.upstream.close()
