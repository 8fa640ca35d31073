"""The documents API: ``/v1/documents`` (add, list, get, delete), thin over the pipeline's
documents backend (the in-process index, or the retrieval worker when retrieval is split off).

Reading needs any key; writing a key with ``can_write`` (``gainrag keys add --can-write``);
every call takes an admission slot like ``/answer`` (the key's rate and in-flight share).
A POST answers when its documents are searchable, with their passage ids and the new index
version (so cached answers made before it are not served for it).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from gainrag.api.auth import Principal
from gainrag.api.deps import PipelineDep, PrincipalDep, StateDep
from gainrag.api.schemas import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    DeleteDocumentResponse,
    DocumentOut,
    DocumentPage,
)
from gainrag.errors import ForbiddenError, UnavailableError
from gainrag.pipeline import Pipeline
from gainrag.retrieval.interface import Documents
from gainrag.retrieval.wire import DOC_ID_PATTERN
from gainrag.wire import ErrorResponse

router = APIRouter(prefix="/v1/documents", tags=["documents"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 502, 503)
}
# a path segment that is a document id (nothing else is proxied to a worker's routes)
DocId = Annotated[str, Path(pattern=DOC_ID_PATTERN, description="A document id.")]


def _documents(pipeline: Pipeline) -> Documents:
    docs = pipeline.c.documents
    if docs is None:
        raise UnavailableError(
            "the documents API is off (GAINRAG_DOCUMENTS__ENABLED=false, or no retrieval)",
            code="documents_unavailable",
        )
    return docs


def _require_write(who: Principal) -> None:
    if not who.can_write:
        raise ForbiddenError(
            f"the API key '{who.name}' may not write documents (gainrag keys add --can-write)",
            code="write_forbidden",
        )


@router.post("", response_model=AddDocumentsResponse, responses=_ERRORS)
async def add_documents(
    body: AddDocumentsRequest, who: PrincipalDep, state: StateDep, pipeline: PipelineDep
) -> AddDocumentsResponse:
    """Add (or replace) documents: split into ~100-word passages, encoded, stored durably and
    indexed; returns once they are searchable. Re-posting a document unchanged is a no-op."""
    _require_write(who)
    async with state.admission.slot(who, "/v1/documents"):  # the key's rate and share
        return await _documents(pipeline).add(body)


@router.get("", response_model=DocumentPage, responses=_ERRORS)
async def list_documents(
    who: PrincipalDep,
    state: StateDep,
    pipeline: PipelineDep,
    collection: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[
        str | None, Query(max_length=128, description="next_after of the last page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DocumentPage:
    """Documents in id order, a page at a time (``after`` = the previous page's ``next_after``)."""
    async with state.admission.slot(who, "/v1/documents"):
        return await _documents(pipeline).list(collection=collection, after=after, limit=limit)


@router.get("/{doc_id}", response_model=DocumentOut, responses=_ERRORS)
async def get_document(
    doc_id: DocId, who: PrincipalDep, state: StateDep, pipeline: PipelineDep
) -> DocumentOut:
    """One document: collection, title, metadata and its passage ids."""
    async with state.admission.slot(who, "/v1/documents/{doc_id}"):
        return await _documents(pipeline).get(doc_id)


@router.delete("/{doc_id}", response_model=DeleteDocumentResponse, responses=_ERRORS)
async def delete_document(
    doc_id: DocId, who: PrincipalDep, state: StateDep, pipeline: PipelineDep
) -> DeleteDocumentResponse:
    """Remove a document and its passages; they are never retrieved again once this returns."""
    _require_write(who)
    async with state.admission.slot(who, "/v1/documents/{doc_id}"):
        return await _documents(pipeline).delete(doc_id)
