"""Feedback on served answers, and the training questions made from it.

Every answer the gateway serves (both answer routes, streamed or not, cache hits too) is recorded
with its question, candidates (ids and scores), selection, answer and model versions, keyed by
the API key's name and the request id, for ``retention_s`` seconds and at most ``max_records``
of them. ``POST /v1/feedback`` finds the record and stores the rating WITH a copy of it (so
feedback outlives the record), and ``gainrag feedback export`` writes the feedback as training
questions (:func:`training_row` states the rule).

Recording never slows or fails an answer: :meth:`FeedbackLog.record` only queues references (no
I/O, no encoding); one background task encodes the queue in a thread and writes it in batches
(one transaction each). A full queue drops records and a failing store loses them: both are
counted (``gainrag_feedback_records_total``), a store failure logged once per outage.

Two stores, one format:

- :class:`SqliteStore`, one file (WAL, ``synchronous=FULL``, like the passage store): the
  embedded single process, or several processes on one machine;
- :class:`RedisStore`: gateway replicas behind a load balancer share it, so feedback may reach
  another replica than the one that served the answer.

A local file per replica would answer 404 to every feedback that reaches another replica, and a
SQLite file on shared network storage is not safe to write from several hosts: hence Redis there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

from gainrag import telemetry
from gainrag.config import FeedbackSettings, Settings
from gainrag.errors import ConfigurationError, NotFoundError, UnavailableError
from gainrag.redis_conn import Outage
from gainrag.types import PSEUDO_ID, AnswerResult

log = logging.getLogger(__name__)

Rating = Literal["up", "down"]
CHAT_ID_PREFIX = "chatcmpl-"  # /v1/chat/completions answers with id "chatcmpl-<request id>"
QUEUE_SIZE = 4096  # served answers waiting to be written; more are dropped (counted)
BATCH = 256  # served answers written in one transaction
FLUSH_TIMEOUT_S = 5.0  # how long feedback waits for the answers queued before it
RETRY_S = 5.0  # after a store failure, recording skips the store this long


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One served answer as it is queued: references only, encoded later off the request path."""

    request_id: str
    key: str  # the API key's name ("anonymous" without keys)
    route: str
    stream: bool
    served_at: float
    question: str
    top_n: int
    models: dict[str, str]
    result: AnswerResult

    def to_json(self) -> dict[str, Any]:
        """The stored record (also the ``served`` part of a feedback)."""
        r = self.result
        return {
            "request_id": self.request_id,
            "key": self.key,
            "route": self.route,
            "stream": self.stream,
            "served_at": self.served_at,
            "question": self.question,
            "top_n": self.top_n,
            "answer": r.answer,
            "selected": [s.passage.id for s in r.selected],
            "candidates": [
                {
                    "id": s.passage.id,
                    "score": s.score,
                    "retrieval_rank": s.retrieval_rank,
                    "retrieval_score": s.retrieval_score,
                    "selector_score": s.selector_score,
                }
                for s in r.candidates
            ],
            "pseudo_passage": r.pseudo_passage,
            "cached": r.cached,
            "degraded": [d.kind for d in r.degraded],
            "models": self.models,
        }


def pack(data: dict[str, Any]) -> bytes:
    """Stored form: compact JSON, zlib-compressed (101 candidates: ~15 KB of JSON, ~5 KB packed).
    ASCII-escaped, so no text (a lone surrogate in a key name) can make encoding fail."""
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 1)


def unpack(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`pack`."""
    data: dict[str, Any] = json.loads(zlib.decompress(blob))
    return data


# -- stores -------------------------------------------------------------------------------------

ServedRow = tuple[str, str, float, bytes]  # key name, request id, served at, packed record


class Store(Protocol):
    """Where served answers and feedback live (one format in both)."""

    async def put_served(self, rows: list[ServedRow], cutoff: float, max_records: int) -> None:
        """Store served answers (a key's reused request id replaces its record), then delete
        those served before ``cutoff`` and the oldest beyond ``max_records``."""

    async def get_served(self, key: str, request_id: str) -> tuple[float, bytes] | None:
        """(served at, packed record), or None."""

    async def count_served(self) -> int:
        """Served answers stored."""

    async def put_feedback(
        self, key: str, request_id: str, given_at: float, rating: str, blob: bytes
    ) -> bool:
        """Store a feedback; True if it replaced one this key gave for the request before."""

    async def feedback(self) -> list[bytes]:
        """Every stored feedback, packed."""

    async def close(self) -> None:
        """Release the connection."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    request_id TEXT NOT NULL,
    served_at REAL NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (key, request_id)
);
CREATE INDEX IF NOT EXISTS served_at ON served (served_at);
CREATE TABLE IF NOT EXISTS feedback (
    key TEXT NOT NULL,
    request_id TEXT NOT NULL,
    given_at REAL NOT NULL,
    rating TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (key, request_id)
);
"""


class SqliteStore:
    """One SQLite file, WAL, ``synchronous=FULL`` (acknowledged feedback survives ``kill -9``).

    The connection is opened at first use, so a file that cannot be opened fails recording and
    feedback (counted, 503), never the gateway's start. One connection and one lock; every call
    runs in a worker thread. Several processes may share the file (a busy timeout, not an error).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            conn = self._connect()
            # IMMEDIATE: the write lock now, so two writing processes never deadlock on an upgrade
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._connect().execute(sql, args).fetchall()

    async def put_served(self, rows: list[ServedRow], cutoff: float, max_records: int) -> None:
        def put(conn: sqlite3.Connection) -> None:
            # REPLACE gives a reused request id a new seq: it counts as the newest record
            conn.executemany(
                "INSERT OR REPLACE INTO served (key, request_id, served_at, record) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.execute("DELETE FROM served WHERE served_at < ?", (cutoff,))
            conn.execute(
                "DELETE FROM served WHERE seq <= "
                "(SELECT seq FROM served ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (max_records,),
            )

        await asyncio.to_thread(self._write, put)

    async def get_served(self, key: str, request_id: str) -> tuple[float, bytes] | None:
        rows = await asyncio.to_thread(
            self._read,
            "SELECT served_at, record FROM served WHERE key = ? AND request_id = ?",
            (key, request_id),
        )
        return (float(rows[0][0]), bytes(rows[0][1])) if rows else None

    async def count_served(self) -> int:
        rows = await asyncio.to_thread(self._read, "SELECT count(*) FROM served")
        return int(rows[0][0])

    async def put_feedback(
        self, key: str, request_id: str, given_at: float, rating: str, blob: bytes
    ) -> bool:
        def put(conn: sqlite3.Connection) -> bool:
            before = conn.execute(
                "SELECT 1 FROM feedback WHERE key = ? AND request_id = ?", (key, request_id)
            ).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO feedback (key, request_id, given_at, rating, record) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, request_id, given_at, rating, blob),
            )
            return before is not None

        replaced: bool = await asyncio.to_thread(self._write, put)
        return replaced

    async def feedback(self) -> list[bytes]:
        rows = await asyncio.to_thread(self._read, "SELECT record FROM feedback")
        return [bytes(r[0]) for r in rows]

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)


# KEYS[1]: records (hash member -> packed record), KEYS[2]: their index (zset member -> served at).
# ARGV: member, served at, record, cutoff, max records. One script: replicas writing at once
# cannot leave a record without its index entry, or trim each other's writes half-way.
_PUT_SERVED = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
for i = 1, #old do redis.call('HDEL', KEYS[1], old[i]) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4]) end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over > 0 then
  local gone = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  for i = 1, #gone do redis.call('HDEL', KEYS[1], gone[i]) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
return over
"""


class RedisStore:
    """Served answers in a hash with a time index (a zset), trimmed by one script per write;
    feedback in a second hash. Every key starts with ``prefix`` (GAINRAG_REDIS__PREFIX)."""

    def __init__(self, url: str, prefix: str, timeout_s: float = 2.0) -> None:
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            decode_responses=False,
        )
        self.records = f"{prefix}feedback:served"
        self.index = f"{prefix}feedback:served:at"
        self.given = f"{prefix}feedback:given"
        self._put = self.client.register_script(_PUT_SERVED)

    @staticmethod
    def _member(key: str, request_id: str) -> str:
        return json.dumps([key, request_id])  # unambiguous whatever a key's name holds

    async def put_served(self, rows: list[ServedRow], cutoff: float, max_records: int) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, rid, served_at, blob in rows:
                await self._put(
                    keys=[self.records, self.index],
                    args=[self._member(key, rid), repr(served_at), blob, repr(cutoff), max_records],
                    client=pipe,
                )
            await pipe.execute()

    async def get_served(self, key: str, request_id: str) -> tuple[float, bytes] | None:
        member = self._member(key, request_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.records, member)
            pipe.zscore(self.index, member)
            blob, served_at = await pipe.execute()
        return None if blob is None or served_at is None else (float(served_at), bytes(blob))

    async def count_served(self) -> int:
        return int(await self.client.zcard(self.index))

    async def put_feedback(
        self, key: str, request_id: str, given_at: float, rating: str, blob: bytes
    ) -> bool:
        added = await self.client.hset(self.given, self._member(key, request_id), blob)
        return int(added) == 0

    async def feedback(self) -> list[bytes]:
        # decode_responses=False: every value is bytes
        return [v for v in await self.client.hvals(self.given) if isinstance(v, bytes)]

    async def close(self) -> None:
        await self.client.aclose()


def backend(settings: Settings) -> Literal["sqlite", "redis"]:
    """The store the settings choose ('auto': Redis when one is configured)."""
    f = settings.feedback
    if f.backend != "auto":
        return f.backend
    return "redis" if (f.redis_url or settings.redis.url) else "sqlite"


def sqlite_path(settings: Settings) -> Path:
    """The sqlite backend's file: ``feedback.path`` (relative to ``home``), or beside the index
    directory (each test's or deployment's own index, never another one's)."""
    path = settings.feedback.path
    if path is None:
        return settings.retrieval.index_dir.parent / "feedback.sqlite"
    path = path.expanduser()
    return path if path.is_absolute() else settings.home / path


def open_store(settings: Settings) -> Store:
    """The configured store (no I/O yet: both connect at first use)."""
    if backend(settings) == "redis":
        url = settings.feedback.redis_url or settings.redis.url
        if not url:
            raise ConfigurationError(
                "GAINRAG_FEEDBACK__BACKEND=redis needs GAINRAG_FEEDBACK__REDIS_URL or "
                "GAINRAG_REDIS__URL"
            )
        return RedisStore(url, settings.redis.prefix)
    return SqliteStore(sqlite_path(settings))


# -- the gateway's log ----------------------------------------------------------------------------


class FeedbackLog:
    """Records served answers in the background and takes feedback on them.

    Open it on the event loop that serves requests (it starts its writer task there);
    ``clock`` is the wall clock (tests pass their own).
    """

    def __init__(
        self, store: Store, settings: FeedbackSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.outage = Outage("feedback store", RETRY_S, log)
        self._queue: asyncio.Queue[Served] = asyncio.Queue(QUEUE_SIZE)
        self._queued = 0  # records put in the queue, ever
        self._done = 0  # records taken out of it and written (or lost), ever
        self._progress = asyncio.Condition()
        self._closed = False
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    @classmethod
    def open(cls, settings: Settings) -> FeedbackLog:
        """The log on the configured store."""
        return cls(open_store(settings), settings.feedback)

    # -- recording (the answer path) ----------------------------------------------------------

    def record(self, served: Callable[[], Served]) -> None:
        """Queue the served answer ``served()`` makes; never raises, never waits."""
        try:
            if self._closed:
                telemetry.FEEDBACK_RECORDS.labels("dropped").inc()
                return
            self._queue.put_nowait(served())
            self._queued += 1
        except asyncio.QueueFull:
            telemetry.FEEDBACK_RECORDS.labels("dropped").inc()
        except Exception:  # recording must never fail an answer
            log.exception("could not queue a served answer for feedback")
            telemetry.FEEDBACK_RECORDS.labels("error").inc()

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                async with self._progress:
                    self._done += len(batch)
                    self._progress.notify_all()

    async def _write(self, batch: list[Served]) -> None:
        outcome = "error"
        try:
            if self.outage.skipping():
                return
            rows = await asyncio.to_thread(_rows, batch)
            cutoff = self.clock() - self.settings.retention_s
            await self.store.put_served(rows, cutoff, self.settings.max_records)
            self.outage.ok()
            outcome = "recorded"
        except Exception as exc:
            self.outage.failed(exc, f"recording {len(batch)} served answers")
        finally:
            telemetry.FEEDBACK_RECORDS.labels(outcome).inc(len(batch))

    async def flush(self) -> None:
        """Wait (up to a few seconds) until every answer queued before this call is written."""
        target = self._queued
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S), self._progress:
                await self._progress.wait_for(lambda: self._done >= target or self._closed)
        except TimeoutError:
            log.warning("feedback: served answers are still being written; looking up anyway")

    # -- feedback (POST /v1/feedback) ---------------------------------------------------------

    async def give(
        self,
        key: str,
        request_id: str,
        rating: Rating,
        correct_answer: str | None = None,
        comment: str | None = None,
    ) -> tuple[str, bool]:
        """Store feedback on an answer served to ``key``: (the request id, whether it replaced
        earlier feedback). 404 for an unknown or expired request id, 503 if the store fails."""
        await self.flush()
        try:
            served = await self._find(key, request_id)
            if served is None:
                raise NotFoundError(
                    f"no answer with request id '{request_id}' was served to this API key in "
                    f"the last {self.settings.retention_s} s",
                    code="request_not_found",
                )
            given_at = self.clock()
            rid = served["request_id"]
            record = {
                "key": key,
                "request_id": rid,
                "rating": rating,
                "correct_answer": correct_answer,
                "comment": comment,
                "given_at": given_at,
                "served": served,
            }
            replaced = await self.store.put_feedback(key, rid, given_at, rating, pack(record))
        except (NotFoundError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("feedback store failed: %s", type(exc).__name__)
            raise UnavailableError(
                "feedback could not be stored; retry shortly", code="feedback_unavailable"
            ) from exc
        telemetry.FEEDBACK.labels(rating).inc()
        return rid, replaced

    async def _find(self, key: str, request_id: str) -> dict[str, Any] | None:
        ids = [request_id]
        if request_id.startswith(CHAT_ID_PREFIX) and len(request_id) > len(CHAT_ID_PREFIX):
            ids.append(request_id[len(CHAT_ID_PREFIX) :])  # a chat completion's id
        for rid in ids:
            found = await self.store.get_served(key, rid)
            # exact at the boundary: kept while at most retention_s old (trimming is lazy)
            if found is not None and self.clock() - found[0] <= self.settings.retention_s:
                return unpack(found[1])
        return None

    async def close(self) -> None:
        """Write what is queued (a few seconds at most), stop the writer, close the store."""
        await self.flush()
        self._closed = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        async with self._progress:
            self._progress.notify_all()
        await self.store.close()


def _rows(batch: list[Served]) -> list[ServedRow]:
    return [(s.key, s.request_id, s.served_at, pack(s.to_json())) for s in batch]


# -- export -------------------------------------------------------------------------------------


def training_row(feedback: dict[str, Any]) -> dict[str, Any] | None:
    """A feedback as a training question, or None when it says no answer.

    The rule: ``answers`` is ``[correct_answer]`` when one was given, else the served answer when
    it was rated up; ``gold_ids`` are the selected passages (not the pseudo-passage) when the
    answer was rated up (they led the reader to a right answer), else empty (which passage holds
    the correct answer is not known). A rating down without a correct answer gives no row.
    """
    served = feedback["served"]
    rating = feedback["rating"]
    correct = feedback.get("correct_answer")
    if correct:
        answers = [correct]
    elif rating == "up" and served["answer"].strip():
        answers = [served["answer"]]
    else:
        return None
    gold = [pid for pid in served["selected"] if pid != PSEUDO_ID] if rating == "up" else []
    return {
        "id": f"feedback-{feedback['key']}-{feedback['request_id']}",
        "question": served["question"],
        "answers": answers,
        "gold_ids": gold,
        "source": "feedback",
        "rating": rating,
        "correct_answer": correct,
        "comment": feedback.get("comment"),
        "served_answer": served["answer"],
        "request_id": feedback["request_id"],
        "key": feedback["key"],
        "route": served["route"],
        "given_at": _iso(feedback["given_at"]),
        "served_at": _iso(served["served_at"]),
        "selected_ids": served["selected"],
        "candidates": served["candidates"],
        "pseudo_passage": served["pseudo_passage"],
        "cached": served["cached"],
        "degraded": served["degraded"],
        "models": served["models"],
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: an ISO 8601 date or time (UTC unless it says otherwise) or an age such as
    ``90m``, ``12h``, ``7d``; as a Unix time."""
    m = _AGO.match(text.strip())
    if m is not None:
        now = time.time() if now is None else now
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"--since {text!r}: expected an ISO 8601 date or time (2026-12-01, "
            "2026-12-01T12:00+01:00) or an age (90m, 12h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True)
class ExportStats:
    """What an export wrote: rows, and feedback left out (rated down without an answer)."""

    written: int
    skipped: int


async def export(
    settings: Settings, out: Path, *, since: float | None = None, rating: Rating | None = None
) -> ExportStats:
    """Write the stored feedback (given at or after ``since``, with ``rating``) as training
    questions to ``out`` (JSONL, oldest feedback first; written whole or not at all)."""
    store = open_store(settings)
    try:
        blobs = await store.feedback()
    finally:
        await store.close()
    given = [unpack(b) for b in blobs]
    given = [
        f
        for f in given
        if (since is None or f["given_at"] >= since) and (rating is None or f["rating"] == rating)
    ]
    given.sort(key=lambda f: (f["given_at"], f["key"], f["request_id"]))
    rows = [training_row(f) for f in given]
    kept = [r for r in rows if r is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return ExportStats(len(kept), len(rows) - len(kept))


def export_command(settings: Settings, args: argparse.Namespace) -> None:
    """``gainrag feedback export --out FILE [--since WHEN] [--rating up|down]``."""
    since = parse_since(args.since) if args.since else None
    stats = asyncio.run(export(settings, args.out, since=since, rating=args.rating))
    print(
        f"wrote {stats.written} training questions to {args.out} ({stats.skipped} feedback "
        "left out: rated down without a correct answer)"
    )
