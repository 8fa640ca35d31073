"""The retrieval worker's wire models (``POST /retrieve``, ``POST /admin/reload-index``) and
the documents API's (``/v1/documents``, served by the gateway and by the worker).

The worker (:mod:`gainrag.api.workers.retrieval`) validates its requests with them and
:class:`~gainrag.retrieval.remote.RemoteRetriever` builds its requests and validates the
responses with them, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gainrag.wire import TEXT_PATTERN, JsonInt, Text


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve``."""

    model_config = ConfigDict(extra="forbid")

    queries: list[StrictStr] = Field(..., min_length=1, description="Questions to search for.")
    k: JsonInt = Field(100, ge=1, le=1000, description="Passages per query.")


class Hit(BaseModel):
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float = Field(..., description="Cosine similarity of normalised vectors.")


class RetrieveResponse(BaseModel):
    """Per query, its top-k passages, best first."""

    results: list[list[Hit]]
    index_version: str
    encoder: str
    index_generation: int | None = Field(
        None, description="Writes since the index was built (orders versions of one store)."
    )
    index_store: str | None = Field(None, description="The index store's identity.")


class ReloadRequest(BaseModel):
    """Body of ``POST /admin/reload-index``."""

    model_config = ConfigDict(extra="forbid")

    index_dir: Text | None = Field(
        None, description="Index directory to load; default: the configured one (rebuilt in place)."
    )


class ReloadResponse(BaseModel):
    """What the swap did."""

    previous_version: str
    version: str
    count: int
    index_dir: str


# -- the documents API (``/v1/documents`` on the gateway, and on the retrieval worker) ----------

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
"""A document id: it appears in URLs and, followed by ``#n``, in passage ids."""


class DocumentIn(BaseModel):
    """One document to add (or replace, if its id exists with other content)."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(
        None,
        pattern=DOC_ID_PATTERN,
        description="Document id; default: derived from the title and text, so re-posting the "
        "same document is a no-op. Letters, digits and . _ : @ - (128 at most).",
    )
    title: Text = Field("", max_length=1000, description="Title; prefixed to every passage.")
    text: Text = Field(..., description="The document: plain text or Markdown.")
    format: Literal["text", "markdown"] = Field(
        "text", description="How to split it: by paragraphs and sentences, or by Markdown sections."
    )
    collection: StrictStr | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Collection; default: GAINRAG_DOCUMENTS__COLLECTION.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Any JSON object, stored and returned (not searched)."
    )


class AddDocumentsRequest(BaseModel):
    """Body of ``POST /v1/documents``."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(..., min_length=1)


class DocumentOut(BaseModel):
    """A stored document (text not repeated: its passages are what is searched)."""

    id: str
    collection: str
    title: str
    metadata: dict[str, Any]
    passage_ids: list[str] = Field(..., description="Its passages, as cited in answers.")
    created: float = Field(..., description="Unix time it was first added.")
    updated: float = Field(..., description="Unix time its content last changed.")


class DocumentResult(BaseModel):
    """What a POST did to one document."""

    id: str
    status: Literal["created", "replaced", "unchanged"]
    passage_ids: list[str]


class AddDocumentsResponse(BaseModel):
    """Every document is searchable when this is sent."""

    documents: list[DocumentResult]
    index_version: str = Field(..., description="The index version after the write.")
    index_generation: int | None = None
    index_store: str | None = None
    passages_added: int
    passages_removed: int
    timings_ms: dict[str, float]


class DocumentPage(BaseModel):
    """A page of ``GET /v1/documents`` (ordered by id)."""

    documents: list[DocumentOut]
    next_after: str | None = Field(
        None, description="Pass as `after` for the next page; null on the last one."
    )
    index_version: str


class DeleteDocumentResponse(BaseModel):
    """What ``DELETE /v1/documents/{id}`` did."""

    id: str
    deleted: bool
    passages_removed: int
    index_version: str
    index_generation: int | None = None
    index_store: str | None = None


def documents_limits(max_documents: int, max_document_chars: int) -> dict[str, dict[str, Any]]:
    """The documents API's configured limits as JSON-schema keywords, for ``declare_limits``
    (the handler checks them with codes of its own: too_many_documents, empty_document...)."""
    return {
        "AddDocumentsRequest.documents": {"maxItems": max_documents},
        "DocumentIn.text": {
            "minLength": 1,
            "maxLength": max_document_chars,
            "pattern": TEXT_PATTERN,
        },
    }
