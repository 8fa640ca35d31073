"""The retrieval worker (``gainrag worker retrieval``): ``POST /retrieve`` over HTTP.

Queries of concurrent requests are batched into one encoder pass and one FAISS search by the
retriever's batcher. ``POST /admin/reload-index`` (bearer token) loads another index directory
and switches to it atomically: in-flight searches finish on the index they started with.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi import Path as PathParam

from gainrag import telemetry
from gainrag.api.auth import WorkerToken
from gainrag.api.cancel import until_disconnect
from gainrag.api.openapi import declare_limits
from gainrag.api.workers.shared import WorkerState, require_query, worker_app
from gainrag.config import Settings
from gainrag.errors import (
    AuthenticationError,
    ConfigurationError,
    ForbiddenError,
    UnavailableError,
    ValidationFailedError,
)
from gainrag.retrieval.documents import LocalDocuments
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.local import LocalRetriever
from gainrag.retrieval.wire import (
    DOC_ID_PATTERN,
    AddDocumentsRequest,
    AddDocumentsResponse,
    DeleteDocumentResponse,
    DocumentOut,
    DocumentPage,
    Hit,
    ReloadRequest,
    ReloadResponse,
    RetrieveRequest,
    RetrieveResponse,
    documents_limits,
)
from gainrag.wire import ErrorResponse, query_schema

log = logging.getLogger(__name__)
DocId = Annotated[str, PathParam(pattern=DOC_ID_PATTERN, description="A document id.")]
_ERRORS: dict[int | str, dict[str, object]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 413, 422, 429, 503)
}


def _models(r: LocalRetriever) -> dict[str, str]:
    return {
        "retriever": r.name,
        "index_version": r.version,
        "passages": str(len(r.index)),
    }


def create_retrieval_app(
    settings: Settings | None = None, retriever: LocalRetriever | None = None
) -> FastAPI:
    """The retrieval worker app (``retriever`` lets tests share a loaded one)."""
    settings = settings or Settings()
    router = APIRouter()
    reload_lock = asyncio.Lock()

    def load() -> LocalRetriever:
        r = settings.retrieval
        loaded = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
        telemetry.INDEX_INFO.labels(loaded.version).set(len(loaded.index))
        return loaded

    def state(request: Request) -> WorkerState[LocalRetriever]:
        s: WorkerState[LocalRetriever] = request.app.state.worker
        return s

    @router.post(
        "/retrieve", dependencies=[WorkerToken], response_model=RetrieveResponse, responses=_ERRORS
    )
    async def retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
        """Top-k passages for each query; concurrent requests share encoder and FAISS batches."""
        r = state(request).require()
        w = settings.worker
        if len(body.queries) > w.max_queries:
            raise ValidationFailedError(
                f"{len(body.queries)} queries; the limit is {w.max_queries} per request "
                "(GAINRAG_WORKER__MAX_QUERIES)",
                code="too_many_queries",
            )
        queries = [
            require_query(f"queries[{i}]", q, w.max_text_chars) for i, q in enumerate(body.queries)
        ]
        # read before the search: a label never newer than the content it describes
        version, generation, store = r.index.stamp()
        results = await until_disconnect(
            request, asyncio.gather(*(r.retrieve(q, body.k) for q in queries))
        )
        return RetrieveResponse(
            results=[
                [Hit(id=h.passage.id, title=h.passage.title, text=h.passage.text, score=h.score)
                 for h in hits]
                for hits in results
            ],
            index_version=version,
            index_generation=generation,
            index_store=store,
            encoder=r.encoder.name,
        )  # fmt: skip

    @router.post("/admin/reload-index", response_model=ReloadResponse, responses=_ERRORS)
    async def reload_index(
        request: Request,
        body: ReloadRequest | None = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> ReloadResponse:
        """Load an index directory and switch to it atomically (bearer token required)."""
        token = settings.worker.admin_token
        if token is None:
            raise ForbiddenError(
                "the admin endpoint is disabled; set GAINRAG_WORKER__ADMIN_TOKEN to enable it",
                code="admin_disabled",
            )
        scheme, _, given = (authorization or "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), expected
        ):
            raise AuthenticationError("missing or wrong bearer token", code="bad_token")
        r = state(request).require()

        index_dir = (
            Path(body.index_dir) if body and body.index_dir else settings.retrieval.index_dir
        )
        async with reload_lock:  # one load at a time; searches go on meanwhile
            try:
                # load, swap and close the old one under the writer lock, in a thread
                old, new = await asyncio.to_thread(
                    r.reload, settings.retrieval.model_copy(update={"index_dir": index_dir})
                )
            except ConfigurationError as exc:
                raise ValidationFailedError(exc.message, code=exc.code) from exc
        if old.version != new.version:
            telemetry.INDEX_INFO.remove(old.version)
        telemetry.INDEX_INFO.labels(new.version).set(len(new))
        log.info("index swapped: %s -> %s (%s)", old.version, new.version, index_dir)
        return ReloadResponse(
            previous_version=old.version,
            version=new.version,
            count=len(new),
            index_dir=str(index_dir),
        )

    documents: dict[int, LocalDocuments] = {}

    def docs(request: Request) -> LocalDocuments:
        r = state(request).require()
        if not settings.documents.enabled:
            raise UnavailableError(
                "the documents API is off (GAINRAG_DOCUMENTS__ENABLED=false)",
                code="documents_unavailable",
            )
        if id(r) not in documents:  # one writer per loaded retriever
            documents.clear()
            documents[id(r)] = LocalDocuments(
                r,
                settings.documents,
                lambda: BiEncoder.from_settings(settings.retrieval, dtype="float32"),
            )
        return documents[id(r)]

    @router.post(
        "/v1/documents",
        dependencies=[WorkerToken],
        response_model=AddDocumentsResponse,
        responses=_ERRORS,
    )
    async def add_documents(body: AddDocumentsRequest, request: Request) -> AddDocumentsResponse:
        """Add or replace documents; returns once they are searchable (the gateway's
        /v1/documents proxies here when retrieval is split off)."""
        return await docs(request).add(body)

    @router.get(
        "/v1/documents", dependencies=[WorkerToken], response_model=DocumentPage, responses=_ERRORS
    )
    async def list_documents(
        request: Request,
        collection: Annotated[str | None, Query(max_length=64)] = None,
        after: Annotated[str | None, Query(max_length=128)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> DocumentPage:
        """A page of documents in id order."""
        return await docs(request).list(collection=collection, after=after, limit=limit)

    @router.get(
        "/v1/documents/{doc_id}",
        dependencies=[WorkerToken],
        response_model=DocumentOut,
        responses=_ERRORS,
    )
    async def get_document(doc_id: DocId, request: Request) -> DocumentOut:
        """One document."""
        return await docs(request).get(doc_id)

    @router.delete(
        "/v1/documents/{doc_id}",
        dependencies=[WorkerToken],
        response_model=DeleteDocumentResponse,
        responses=_ERRORS,
    )
    async def delete_document(doc_id: DocId, request: Request) -> DeleteDocumentResponse:
        """Remove a document and its passages."""
        return await docs(request).delete(doc_id)

    app = worker_app(
        "gainrag retrieval worker",
        "Dense retrieval: all-MiniLM-L6-v2 + FAISS, batched across concurrent requests.",
        settings,
        load,
        _models,
        router,
        service="retrieval",
        model=retriever,
        body_limits={"/v1/documents": settings.documents.max_body_bytes},
    )
    w = settings.worker
    declare_limits(
        app,
        {
            "RetrieveRequest.queries": {"maxItems": w.max_queries},
            "RetrieveRequest.queries[]": query_schema(w.max_text_chars),
            **documents_limits(
                settings.documents.max_documents, settings.documents.max_document_chars
            ),
        },
    )
    return app
