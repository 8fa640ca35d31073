"""Writes to the passage index through the documents API: split, encode, commit, apply.

One writer at a time (the retriever's ``write_lock``), searches meanwhile: a write encodes its
passages, commits them to the store in one durable transaction (the acknowledgement point: after
it, ``kill -9`` loses nothing; before it, nothing of the write exists) and then makes them
searchable in FAISS and BM25 under the index's lock. The response is sent after that, so a
document is searchable when its POST returns.

Passage ids are ``<document id>#<n>``: a citation names its document. The shipped corpus's
passages are one-passage documents whose passage id is the document id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from gainrag import telemetry
from gainrag.config import DocumentSettings
from gainrag.errors import ConflictError, NotFoundError, OverloadedError, ValidationFailedError
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.local import LocalRetriever
from gainrag.retrieval.splitter import split
from gainrag.retrieval.store import DocumentRecord, NewDocument, content_sha256
from gainrag.retrieval.wire import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    DeleteDocumentResponse,
    DocumentIn,
    DocumentOut,
    DocumentPage,
    DocumentResult,
)
from gainrag.textcheck import is_blank
from gainrag.types import Passage

_T = TypeVar("_T")
Status = Literal["created", "replaced", "unchanged"]


@dataclass
class _Prepared:
    doc: DocumentIn
    id: str
    collection: str
    sha: str


class LocalDocuments:
    """The documents API over the in-process index of ``retriever``."""

    def __init__(
        self,
        retriever: LocalRetriever,
        settings: DocumentSettings,
        encoder: Callable[[], BiEncoder],
    ) -> None:
        self.retriever = retriever
        self.settings = settings
        self._encoder_factory = encoder
        self._encoder: BiEncoder | None = None
        self._pending = 0  # writes queued or running (the event loop's thread only)
        # Writes take turns anyway (the writer lock); a thread of their own keeps queued writes
        # from occupying the event loop's default pool, which reads and other work share.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="documents")

    def _fp32_encoder(self) -> BiEncoder:
        # Stored vectors are fp32 whatever the query dtype (as `index build` makes them): the
        # index must not depend on the machine that encoded it. The serving encoder is reused
        # when it is fp32 already; otherwise one fp32 copy is loaded on the first write.
        if self._encoder is None:
            served = self.retriever.encoder
            self._encoder = served if served.dtype.dtype == "float32" else self._encoder_factory()
        return self._encoder

    # -- checks (before anything is queued) -------------------------------------------------

    def prepare(self, body: AddDocumentsRequest) -> list[_Prepared]:
        """Check limits and derive ids: a bad document fails the request before any work."""
        s = self.settings
        if len(body.documents) > s.max_documents:
            raise ValidationFailedError(
                f"{len(body.documents)} documents; the limit is {s.max_documents} per request "
                "(GAINRAG_DOCUMENTS__MAX_DOCUMENTS)",
                code="too_many_documents",
            )
        out: dict[str, _Prepared] = {}
        for i, doc in enumerate(body.documents):
            where = f"documents[{i}]"
            if is_blank(doc.text):
                raise ValidationFailedError(f"{where}.text is empty", code="empty_document")
            if len(doc.text) > s.max_document_chars:
                raise ValidationFailedError(
                    f"{where}.text has {len(doc.text)} characters; the limit is "
                    f"{s.max_document_chars} (GAINRAG_DOCUMENTS__MAX_DOCUMENT_CHARS)",
                    code="document_too_long",
                )
            meta_bytes = len(json.dumps(doc.metadata, ensure_ascii=False).encode())
            if meta_bytes > s.max_metadata_bytes:
                raise ValidationFailedError(
                    f"{where}.metadata is {meta_bytes} bytes of JSON; the limit is "
                    f"{s.max_metadata_bytes} (GAINRAG_DOCUMENTS__MAX_METADATA_BYTES)",
                    code="metadata_too_large",
                )
            sha = content_sha256(doc.title, doc.text, doc.format)
            doc_id = doc.id or f"doc-{hashlib.sha256(sha.encode()).hexdigest()[:16]}"
            # an id given twice: the request applies in order, so the later document counts (in
            # the place of the first), as two requests one after the other would leave it
            out[doc_id] = _Prepared(doc, doc_id, doc.collection or s.collection, sha)
        return list(out.values())

    # -- writes -----------------------------------------------------------------------------

    async def add(self, body: AddDocumentsRequest) -> AddDocumentsResponse:
        """Store and index the documents; returns once they are searchable."""
        prepared = self.prepare(body)
        return await self._queued(lambda: self._add(prepared))

    async def delete(self, doc_id: str) -> DeleteDocumentResponse:
        """Remove a document and its passages from the store and the index (404 if unknown)."""
        return await self._queued(lambda: self._delete(doc_id))

    async def _queued(self, work: Callable[[], _T]) -> _T:
        if self._pending >= self.settings.max_queue:
            raise OverloadedError(
                f"{self._pending} document writes are queued (GAINRAG_DOCUMENTS__MAX_QUEUE); "
                "retry shortly"
            )
        self._pending += 1
        telemetry.INGEST_QUEUE.inc()
        future = asyncio.get_running_loop().run_in_executor(self._executor, work)

        def done(_: object) -> None:
            # when the write itself ends (not when a client that left stops waiting): the queue
            # limit counts every write still to run
            self._pending -= 1
            telemetry.INGEST_QUEUE.dec()

        future.add_done_callback(done)
        # The write runs to its end even if the client goes away: whole or absent, never cut.
        return await asyncio.shield(future)

    def _add(self, prepared: list[_Prepared]) -> AddDocumentsResponse:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        r = self.retriever
        with r.write_lock:
            timings["wait"] = _ms(t0)  # for the writes before this one
            t0 = time.perf_counter()
            index = r.index
            index.claim_writer()
            stored = index.store.content_shas([p.id for p in prepared])
            todo = [p for p in prepared if stored.get(p.id) != p.sha]
            t = time.perf_counter()
            docs = [self._split(p) for p in todo]
            timings["split"] = _ms(t)
            t = time.perf_counter()
            vectors = self._encode([p for _, ps in docs for p in ps])
            timings["encode"] = _ms(t)
            new, pos = [], 0
            for p, passages in docs:
                new.append(
                    NewDocument(
                        id=p.id,
                        collection=p.collection,
                        title=p.doc.title,
                        metadata=p.doc.metadata,
                        content_sha256=p.sha,
                        passages=passages,
                        vectors=vectors[pos : pos + len(passages)],
                    )
                )
                pos += len(passages)
            # unchanged documents still pass through commit: their metadata may have moved
            unchanged = [
                NewDocument(p.id, p.collection, p.doc.title, p.doc.metadata, p.sha, [], _EMPTY)
                for p in prepared
                if stored.get(p.id) == p.sha
            ]
            t = time.perf_counter()
            try:
                change = index.store.commit([*new, *unchanged], [])
            except sqlite3.IntegrityError as exc:
                raise ConflictError(
                    "a passage id of these documents is already used by another document",
                    code="passage_id_conflict",
                ) from exc
            timings["commit"] = _ms(t)
            t = time.perf_counter()
            index.apply(change)
            r.version = index.version
            stamp = index.stamp()
            timings["apply"] = _ms(t)
            timings["total"] = _ms(t0)  # the write itself, its wait not included
            results = []
            for p in prepared:  # read before the next write can change them
                status: Status = (
                    "unchanged"
                    if stored.get(p.id) == p.sha
                    else "replaced"
                    if p.id in stored
                    else "created"
                )
                telemetry.INGEST_DOCUMENTS.labels(status).inc()
                rec = index.store.document(p.id)
                ids = rec.passage_ids if rec else []
                results.append(DocumentResult(id=p.id, status=status, passage_ids=ids))
        for stage, ms in timings.items():
            telemetry.INGEST_SECONDS.labels(stage).observe(ms / 1000)
        telemetry.INGEST_PASSAGES.labels("added").inc(len(change.added))
        telemetry.INGEST_PASSAGES.labels("removed").inc(len(change.removed))
        return AddDocumentsResponse(
            documents=results,
            index_version=change.version,
            index_generation=change.generation,
            index_store=stamp[2],
            passages_added=len(change.added),
            passages_removed=len(change.removed),
            timings_ms={k: round(v, 2) for k, v in timings.items()},
        )

    def _split(self, p: _Prepared) -> tuple[_Prepared, list[Passage]]:
        texts = split(p.doc.text, p.doc.format, words=self.settings.passage_words)
        return p, [
            Passage(id=f"{p.id}#{n}", title=p.doc.title, text=t) for n, t in enumerate(texts)
        ]

    def _encode(self, passages: list[Passage]) -> np.ndarray:
        encoder = self._fp32_encoder()
        out = np.empty((len(passages), encoder.dim), dtype=np.float32)
        step = self.settings.encode_batch
        # small calls: the encoder's lock is released between them, so queries that share the
        # encoder (an fp32 serving encoder) wait for one batch, not for the whole document
        for start in range(0, len(passages), step):
            chunk = passages[start : start + step]
            out[start : start + len(chunk)] = encoder.encode(
                [p.as_candidate_text() for p in chunk], batch_size=step
            )
        return out

    def _delete(self, doc_id: str) -> DeleteDocumentResponse:
        r = self.retriever
        with r.write_lock:
            t0 = time.perf_counter()
            index = r.index
            index.claim_writer()
            if index.store.document(doc_id) is None:
                raise NotFoundError(f"no document {doc_id!r}", code="document_not_found")
            change = index.store.commit([], [doc_id])
            index.apply(change)
            r.version = index.version
            stamp = index.stamp()
            telemetry.INGEST_SECONDS.labels("total").observe(time.perf_counter() - t0)
        telemetry.INGEST_PASSAGES.labels("removed").inc(len(change.removed))
        telemetry.INGEST_DOCUMENTS.labels("deleted").inc()
        return DeleteDocumentResponse(
            id=doc_id,
            deleted=True,
            passages_removed=len(change.removed),
            index_version=change.version,
            index_generation=change.generation,
            index_store=stamp[2],
        )

    async def close(self) -> None:
        """Let queued writes finish (the retriever closes the index after)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # -- reads ------------------------------------------------------------------------------

    async def get(self, doc_id: str) -> DocumentOut:
        """One stored document (404 if unknown)."""
        rec = await asyncio.to_thread(self.retriever.index.store.document, doc_id)
        if rec is None:
            raise NotFoundError(f"no document {doc_id!r}", code="document_not_found")
        return _out(rec)

    async def list(self, *, collection: str | None, after: str | None, limit: int) -> DocumentPage:
        """A page of documents in id order."""
        index = self.retriever.index
        recs = await asyncio.to_thread(
            index.store.documents, collection=collection, after=after, limit=limit + 1
        )
        more = len(recs) > limit
        recs = recs[:limit]
        return DocumentPage(
            documents=[_out(r) for r in recs],
            next_after=recs[-1].id if more and recs else None,
            index_version=index.version,
        )


_EMPTY = np.empty((0, 0), dtype=np.float32)


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000


def _out(rec: DocumentRecord) -> DocumentOut:
    return DocumentOut(
        id=rec.id,
        collection=rec.collection,
        title=rec.title,
        metadata=rec.metadata,
        passage_ids=rec.passage_ids,
        created=rec.created,
        updated=rec.updated,
    )
