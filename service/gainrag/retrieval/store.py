"""The passage store: documents, their passages and the passages' vectors in one SQLite file.

It is the index's source of truth. FAISS and the BM25 index are derived from it and rebuilt
from it when they lag (after a crash between a store commit and their own update). Every write
is one transaction in WAL mode with ``synchronous=FULL``: once :meth:`PassageStore.commit`
returns, the change survives ``kill -9`` and power loss, and a crash before that leaves no trace
of it. So the service acknowledges a document only after this commit.

Passage ``fid`` s (the int64 ids FAISS and BM25 know passages by) come from ``AUTOINCREMENT``:
never reused, so an id in a stale derived index can never name a different passage.

Why SQLite and not a server: the embedded default is one process on a 2-core machine; SQLite is
in the standard library, transactional and fast enough (10^4 passages load in ~0.3 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gainrag.errors import ConfigurationError
from gainrag.types import Passage

STORE_FILE = "store.sqlite"
CORPUS_COLLECTION = "corpus"  # the shipped corpus: one document per passage, ids unchanged

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    title TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    passages INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_collection ON documents (collection, id);
CREATE TABLE IF NOT EXISTS passages (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents (id),
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages (doc_id);
"""


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: split into passages and encoded."""

    id: str
    collection: str
    title: str
    metadata: dict[str, Any]
    content_sha256: str
    passages: list[Passage]
    vectors: np.ndarray  # float32, one row per passage


@dataclass(frozen=True)
class DocumentRecord:
    """A stored document and its passage ids."""

    id: str
    collection: str
    title: str
    metadata: dict[str, Any]
    content_sha256: str
    passage_ids: list[str]
    created: float
    updated: float


@dataclass
class Change:
    """What one committed write did, for the derived indexes to apply."""

    generation: int
    version: str
    previous_version: str
    added: list[tuple[int, Passage]] = field(default_factory=list)
    added_vectors: np.ndarray | None = None
    removed: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether nothing changed (every document was already stored as it is)."""
        return not self.added and not self.removed


def content_sha256(title: str, text: str, fmt: str) -> str:
    """What makes a re-add of the same document a no-op: its title, text and format."""
    return hashlib.sha256(f"{fmt}\0{title}\0{text}".encode()).hexdigest()


def next_version(previous: str, added: Sequence[Passage], removed: Sequence[str]) -> str:
    """The version after a change: a hash chain over the changes, so that the version (and every
    cache key holding it) changes with the content, and the same writes give the same version."""
    h = hashlib.sha256(previous.encode())
    for p in sorted(added, key=lambda p: p.id):
        h.update(f"+{p.id}\0{p.title}\0{p.text}\n".encode())
    for pid in sorted(removed):
        h.update(f"-{pid}\n".encode())
    return h.hexdigest()[:12]


class PassageStore:
    """One SQLite file; thread-safe (one connection, one lock: writes are serialised anyway)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._conn = conn
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls, path: Path, *, create: bool = False, read_only: bool = False, immutable: bool = False
    ) -> PassageStore:
        """Open the store at ``path`` (a file); ``create`` makes a new empty one if missing;
        ``read_only`` opens it without writing anything (``immutable``: not even locks, as on a
        read-only mount, which is detected too)."""
        if not create and not path.is_file():
            raise ConfigurationError(
                f"no passage store at {path}; run `gainrag index build`", code="index_missing"
            )
        if read_only:
            # In a read-only directory, immutable: no locks and no -shm file (there is no room
            # for them; `index build` leaves the store in rollback-journal mode, so the file alone
            # holds everything). In a writable one, a plain read-only connection that sees a
            # live writer's WAL.
            immutable = immutable or not os.access(path.parent, os.W_OK)
            mode = "ro&immutable=1" if immutable else "ro"
            conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, check_same_thread=False)
            return cls(path, conn, read_only=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the retriever's batcher thread, the ingestion thread and the
        # event loop's executor all use it, always under self._lock.
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # durable at COMMIT: acknowledged means kept
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        return cls(path, conn)

    def seal(self) -> None:
        """Fold the WAL into the main file and leave WAL mode (end of a bulk build): a read-only
        mount can then open the file alone. A later writer switches WAL on again."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.execute("PRAGMA journal_mode=DELETE")

    def close(self) -> None:
        """Close the connection (checkpointing the WAL into the main file)."""
        with self._lock:
            self._conn.close()

    # -- metadata ---------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """Everything in the meta table (JSON values decoded)."""
        with self._lock:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def set_meta(self, values: dict[str, Any]) -> None:
        """Set meta values in one transaction."""
        with self._lock, self._transaction():
            self._put_meta(values)

    def _put_meta(self, values: dict[str, Any]) -> None:
        self._conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a read transaction), though another process
        writes meanwhile: loading reads the meta, the vectors and the passages apart."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    # -- reads ------------------------------------------------------------------------------

    def count(self) -> int:
        """Stored passages."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM passages").fetchone()[0])

    def count_documents(self) -> int:
        """Stored documents."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def passages(self) -> tuple[list[int], list[Passage], list[str]]:
        """Every passage: fids, passages and their document ids, in fid order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT fid, id, title, text, doc_id FROM passages ORDER BY fid"
            ).fetchall()
        return (
            [r[0] for r in rows],
            [Passage(id=r[1], title=r[2], text=r[3]) for r in rows],
            [r[4] for r in rows],
        )

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every passage's fid and vector, in fid order (float32, shape (n, dim))."""
        with self._lock:
            rows = self._conn.execute("SELECT fid, vector FROM passages ORDER BY fid").fetchall()
        fids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return fids, vecs.reshape(len(rows), dim).copy()

    def document(self, doc_id: str) -> DocumentRecord | None:
        """A stored document, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT id, collection, title, metadata, content_sha256, created, updated "
                "FROM documents WHERE id = ?",
                (doc_id,),
            ).fetchone()
            if row is None:
                return None
            return _record(row, self._passage_ids(doc_id))

    def content_shas(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """The stored content hash of each of these documents that exists."""
        out: dict[str, str] = {}
        with self._lock:
            for doc_id in doc_ids:
                row = self._conn.execute(
                    "SELECT content_sha256 FROM documents WHERE id = ?", (doc_id,)
                ).fetchone()
                if row is not None:
                    out[doc_id] = row[0]
        return out

    def documents(
        self, *, collection: str | None, after: str | None, limit: int
    ) -> list[DocumentRecord]:
        """A page of documents in id order, after the id ``after`` (keyset paging: stable while
        documents are added or deleted)."""
        where, args = [], []
        if collection is not None:
            where.append("collection = ?")
            args.append(collection)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        sql = (
            "SELECT id, collection, title, metadata, content_sha256, created, updated "
            "FROM documents"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, [*args, limit]).fetchall()
            return [_record(row, self._passage_ids(row[0])) for row in rows]

    def _passage_ids(self, doc_id: str) -> list[str]:
        """A document's passage ids in fid order (under the caller's lock)."""
        rows = self._conn.execute(
            "SELECT id FROM passages WHERE doc_id = ? ORDER BY fid", (doc_id,)
        )
        return [r[0] for r in rows]

    def collections(self) -> dict[str, int]:
        """Documents per collection."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT collection, count(*) FROM documents GROUP BY collection ORDER BY 1"
            ).fetchall()
        return {c: int(n) for c, n in rows}

    # -- writes -----------------------------------------------------------------------------

    def commit(self, add: Sequence[NewDocument], delete: Sequence[str]) -> Change:
        """Store ``add`` (replacing documents of the same id whose content changed; unchanged ones
        are skipped) and delete the documents ``delete``, in ONE durable transaction.

        Returns the change for the derived indexes; its generation and version are unchanged
        when nothing changed.
        """
        now = time.time()
        with self._lock, self._transaction():
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            generation = json.loads(meta.get("generation", "0"))
            version = json.loads(meta.get("version", '""'))
            added: list[tuple[int, Passage]] = []
            vectors: list[np.ndarray] = []
            removed: list[int] = []
            removed_ids: list[str] = []
            for doc_id in delete:
                self._drop(doc_id, removed, removed_ids)
            for doc in add:
                row = self._conn.execute(
                    "SELECT content_sha256, created FROM documents WHERE id = ?", (doc.id,)
                ).fetchone()
                created = now
                if row is not None:
                    if row[0] == doc.content_sha256:
                        # same content: only the metadata and collection may move (no reindex)
                        self._conn.execute(
                            "UPDATE documents SET metadata = ?, collection = ? WHERE id = ?",
                            (json.dumps(doc.metadata), doc.collection, doc.id),
                        )
                        continue
                    created = row[1]
                    self._drop(doc.id, removed, removed_ids)
                self._conn.execute(
                    "INSERT INTO documents (id, collection, title, metadata, content_sha256, "
                    "passages, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        doc.id,
                        doc.collection,
                        doc.title,
                        json.dumps(doc.metadata),
                        doc.content_sha256,
                        len(doc.passages),
                        created,
                        now,
                    ),
                )
                vecs = np.ascontiguousarray(doc.vectors, dtype=np.float32)
                for p, v in zip(doc.passages, vecs, strict=True):
                    cur = self._conn.execute(
                        "INSERT INTO passages (id, doc_id, title, text, vector) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (p.id, doc.id, p.title, p.text, v.tobytes()),
                    )
                    assert cur.lastrowid is not None
                    added.append((int(cur.lastrowid), p))
                vectors.append(vecs)
            change = Change(generation, version, version)
            if added or removed:
                change.generation = generation + 1
                change.version = next_version(version, [p for _, p in added], removed_ids)
                change.added = added
                change.added_vectors = np.concatenate(vectors) if vectors else None
                change.removed = removed
                self._put_meta(
                    {
                        "generation": change.generation,
                        "version": change.version,
                        "count": int(
                            self._conn.execute("SELECT count(*) FROM passages").fetchone()[0]
                        ),
                    }
                )
        return change

    def _drop(self, doc_id: str, fids: list[int], ids: list[str]) -> None:
        rows = self._conn.execute(
            "SELECT fid, id FROM passages WHERE doc_id = ?", (doc_id,)
        ).fetchall()
        fids.extend(int(r[0]) for r in rows)
        ids.extend(r[1] for r in rows)
        self._conn.execute("DELETE FROM passages WHERE doc_id = ?", (doc_id,))
        self._conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def bulk_load(
        self, passages: Iterator[tuple[Passage, np.ndarray]], *, collection: str, chunk: int = 2048
    ) -> int:
        """Insert corpus passages as one-passage documents (id = passage id), in one transaction
        (``index build``: a fresh store, so there is nothing to replace)."""
        now = time.time()
        n = 0
        with self._lock, self._transaction():
            batch: list[tuple[Passage, np.ndarray]] = []
            for item in passages:
                batch.append(item)
                if len(batch) >= chunk:
                    n += self._insert_corpus(batch, collection, now)
                    batch = []
            n += self._insert_corpus(batch, collection, now)
        return n

    def _insert_corpus(
        self, batch: list[tuple[Passage, np.ndarray]], collection: str, now: float
    ) -> int:
        self._conn.executemany(
            "INSERT INTO documents (id, collection, title, metadata, content_sha256, passages, "
            "created, updated) VALUES (?, ?, ?, '{}', ?, 1, ?, ?)",
            [
                (p.id, collection, p.title, content_sha256(p.title, p.text, "passage"), now, now)
                for p, _ in batch
            ],
        )
        self._conn.executemany(
            "INSERT INTO passages (id, doc_id, title, text, vector) VALUES (?, ?, ?, ?, ?)",
            [
                (p.id, p.id, p.title, p.text, np.asarray(v, dtype=np.float32).tobytes())
                for p, v in batch
            ],
        )
        return len(batch)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock now, so two writers never deadlock on an upgrade
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _record(row: tuple[Any, ...], pids: list[str]) -> DocumentRecord:
    return DocumentRecord(
        id=row[0],
        collection=row[1],
        title=row[2],
        metadata=json.loads(row[3]),
        content_sha256=row[4],
        passage_ids=pids,
        created=row[5],
        updated=row[6],
    )
