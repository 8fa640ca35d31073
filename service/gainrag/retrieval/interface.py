"""The retriever interface (in-process now; a remote worker client implements the same)."""

from __future__ import annotations

from typing import Protocol

from gainrag.retrieval.wire import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    DeleteDocumentResponse,
    DocumentOut,
    DocumentPage,
)
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


class Documents(Protocol):
    """The documents API's backend: the in-process index (:mod:`gainrag.retrieval.documents`)
    or the retrieval worker's (:mod:`gainrag.retrieval.remote`). Writes return once searchable."""

    async def add(self, body: AddDocumentsRequest) -> AddDocumentsResponse:
        """Add or replace documents."""
        ...

    async def get(self, doc_id: str) -> DocumentOut:
        """One document (NotFoundError if unknown)."""
        ...

    async def list(self, *, collection: str | None, after: str | None, limit: int) -> DocumentPage:
        """A page of documents in id order."""
        ...

    async def delete(self, doc_id: str) -> DeleteDocumentResponse:
        """Remove a document (NotFoundError if unknown)."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...
