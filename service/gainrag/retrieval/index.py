"""The passage index: a SQLite store (the truth), FAISS over its vectors and, for hybrid
retrieval, BM25 over its texts, kept in step under one lock.

An index directory holds ``store.sqlite`` (documents, passages, float32 vectors, meta: encoder,
count, version, generation; :mod:`gainrag.retrieval.store`), ``index.faiss`` with
``index.faiss.json`` (the store generation it reflects: a start-up cache, rebuilt from the store
when it lags), ``bm25/`` (:mod:`gainrag.retrieval.lexical`, same rule) and ``manifest.json``
(what the last bulk build made, for people and for readiness checks).

FAISS is an ``IndexIDMap2`` over a flat inner-product index: passages are added and removed by
their store ``fid`` without a rebuild, and their vectors can be read back by id. The version
string goes into cache keys and API responses, so an answer can always be traced to the index
content that made it; every write changes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np
from tqdm import tqdm

from gainrag.errors import ConfigurationError, UnavailableError
from gainrag.retrieval.fusion import minmax_mix, rrf
from gainrag.retrieval.store import (
    CORPUS_COLLECTION,
    STORE_FILE,
    Change,
    PassageStore,
)
from gainrag.types import Passage, Retrieved
from gainrag.util import file_sha256

if TYPE_CHECKING:
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.lexical import LexicalIndex

log = logging.getLogger(__name__)

INDEX_FORMAT = 2
FAISS_FILE = "index.faiss"
FAISS_STAMP = "index.faiss.json"
LEXICAL_DIR = "bm25"
WRITER_LOCK = "writer.lock"
MANIFEST = "manifest.json"


def iter_corpus(path: Path) -> Iterator[Passage]:
    """Passages of a JSONL corpus with ``id``, ``title`` and ``text`` fields."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Passage(id=str(row["id"]), title=row.get("title") or "", text=row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigurationError(f"{path}:{lineno}: not a passage row ({exc})") from exc


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval merges the dense and the BM25 lists (:mod:`gainrag.retrieval.fusion`).

    ``depth``: how many hits each list contributes before fusing (at least the k asked for).
    ``score``: what the fused list reports as each passage's retrieval score (the part the
    ranking mixes with the selector's): the fusion's own score, or the dense cosine (then the
    fusion chooses which k passages and in what order, and the ranking's mix stays on the scale
    it was tuned on).
    """

    score: Literal["fused", "dense"] = "fused"
    method: Literal["rrf", "mix"] = "mix"
    rrf_c: int = 60
    weight: float = 0.3  # the BM25 list's weight in the min-max mix
    depth: int = 100


def build_index(
    corpus: Path,
    out: Path,
    encoder: BiEncoder,
    *,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode every passage and write a new index directory atomically; return its manifest."""
    if encoder.dtype.dtype != "float32":
        # index vectors are stored and compared across machines: never machine-dependent
        raise ConfigurationError(
            f"an index is built in float32, not {encoder.dtype.dtype} (BiEncoder dtype='float32')"
        )
    passages = list(iter_corpus(corpus))
    if not passages:
        raise ConfigurationError(f"corpus {corpus} is empty")
    ids = [p.id for p in passages]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"corpus {corpus} has duplicate passage ids")
    started = time.perf_counter()
    with tqdm(
        total=len(passages), desc="encoding passages", unit="psg", disable=not show_progress
    ) as bar:
        vectors = encoder.encode(
            [p.as_candidate_text() for p in passages], batch_size=batch_size, progress=bar.update
        )
    corpus_sha = file_sha256(corpus)
    manifest = _manifest(encoder.name, encoder.max_length, encoder.dim, len(passages))
    manifest.update(
        corpus=str(corpus),
        corpus_sha256=corpus_sha,
        version=_built_version(encoder.name, encoder.max_length, corpus_sha),
    )
    manifest["built_seconds"] = round(time.perf_counter() - started, 2)
    _write_new(out, manifest, zip(passages, vectors, strict=True))
    return manifest


def _manifest(encoder: str, max_length: int, dim: int, count: int) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "encoder": encoder,
        "max_length": max_length,
        "dim": dim,
        "metric": "inner_product",
        "normalized": True,
        "index_type": "flat",
        "count": count,
        "generation": 0,
        # this store's identity: generations are counted per store (a rebuild starts again)
        "store_id": uuid.uuid4().hex,
    }


def _built_version(encoder: str, max_length: int, corpus_sha: str) -> str:
    # format 1's formula, kept: a migrated index keeps its version, so caches stay warm
    return hashlib.sha256(f"1|{encoder}|{max_length}|flat|{corpus_sha}".encode()).hexdigest()[:12]


def _write_new(
    out: Path, manifest: dict[str, Any], rows: Iterator[tuple[Passage, np.ndarray]]
) -> None:
    """Write a store (and its derived files) into ``out.tmp``, then swap it in by one rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    store = PassageStore.open(tmp / STORE_FILE, create=True)
    try:
        store.bulk_load(rows, collection=CORPUS_COLLECTION)
        store.set_meta(manifest)
    finally:
        store.close()
    built = PassageIndex.load(tmp, use_gpu=False, lexical=True)  # derives FAISS and BM25 once
    built.close()
    store = PassageStore.open(tmp / STORE_FILE)
    store.seal()
    store.close()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    # Two renames (a directory cannot replace another in one): a reader finds the old index
    # whole, for an instant none, or the new one whole; never a half-written one.
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def migrate_v1(index_dir: Path) -> None:
    """Turn a format-1 directory (``index.faiss`` + ``passages.jsonl``) into a store in place,
    reusing its vectors (no re-encoding) and keeping its version."""
    old = json.loads((index_dir / MANIFEST).read_text())
    index = faiss.read_index(str(index_dir / FAISS_FILE))
    with (index_dir / "passages.jsonl").open(encoding="utf-8") as f:
        passages = [Passage(**json.loads(line)) for line in f if line.strip()]
    if index.ntotal != len(passages):
        raise ConfigurationError(f"index at {index_dir} is inconsistent; rebuild it")
    vectors = index.reconstruct_n(0, index.ntotal)
    manifest = _manifest(old["encoder"], old["max_length"], old["dim"], len(passages))
    manifest.update({k: old[k] for k in ("corpus", "corpus_sha256", "version") if k in old})
    manifest["migrated_from_format"] = old.get("format", 1)
    log.info("migrating the format-1 index at %s to a passage store", index_dir)
    _write_new(index_dir, manifest, zip(passages, vectors, strict=True))


def read_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The index's live metadata (its store's meta table), or None if there is no index. A
    format-1 directory answers with its old manifest (it is migrated when loaded)."""
    if (index_dir / STORE_FILE).is_file():
        store = PassageStore.open(index_dir / STORE_FILE, read_only=True)
        try:
            meta = store.meta()
        finally:
            store.close()
        return meta if "version" in meta else None
    path = index_dir / MANIFEST
    if path.is_file() and (index_dir / "passages.jsonl").is_file():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return None


def writes_since_build(index_dir: Path) -> int:
    """Writes through the documents API since the index was built (its generation): adds,
    replacements and deletes alike, in any collection (the corpus's too)."""
    if not (index_dir / STORE_FILE).is_file():
        return 0
    store = PassageStore.open(index_dir / STORE_FILE, read_only=True)
    try:
        return int(store.meta().get("generation", 0))
    finally:
        store.close()


def faiss_gpu_count() -> int:
    """GPUs visible to the installed faiss (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class PassageIndex:
    """A loaded index directory: the store, FAISS (CPU, or a GPU copy), optional BM25.

    Searches and writes take one lock, so a search sees the index before a write or after it,
    never half of it (both are short: a flat search over 10^4 vectors is milliseconds; the
    expensive part of a write, encoding, happens before the lock).
    """

    def __init__(
        self,
        index_dir: Path,
        store: PassageStore,
        cpu_index: Any,
        manifest: dict[str, Any],
        lexical: LexicalIndex | None,
        rows: tuple[list[int], list[Passage], list[str]],
        *,
        use_gpu: bool,
    ) -> None:
        self.index_dir = index_dir
        self.store = store
        self.manifest = manifest
        self.lexical = lexical
        self._cpu = cpu_index
        self._lock = threading.Lock()
        fids, passages, _ = rows
        self._by_fid: dict[int, Passage] = dict(zip(fids, passages, strict=True))
        self._fid: dict[str, int] = {p.id: f for f, p in self._by_fid.items()}
        self._dirty = False
        self.read_only = store.read_only
        self._writer_fd: int | None = None
        self.on_gpu = False
        self._gpu_res: Any = None
        self._search_index = cpu_index
        if use_gpu and faiss_gpu_count() > 0:
            self._gpu_res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu_index)
            self.on_gpu = True
            log.info("index moved to GPU FAISS")

    @property
    def version(self) -> str:
        """Index version: changes with encoder, content and every write."""
        return str(self.manifest["version"])

    @property
    def generation(self) -> int:
        """Committed writes since the build."""
        return int(self.manifest.get("generation", 0))

    def stamp(self) -> tuple[str, int, str]:
        """(version, generation, store id), read together: a write replaces the manifest whole."""
        m = self.manifest
        return str(m["version"]), int(m.get("generation", 0)), str(m.get("store_id", ""))

    def __len__(self) -> int:
        return len(self._by_fid)

    @classmethod
    def load(
        cls,
        index_dir: Path,
        *,
        use_gpu: bool = True,
        lexical: bool = False,
        read_only: bool | None = None,
    ) -> PassageIndex:
        """Load an index directory (migrating a format-1 one); FAISS and BM25 are read from their
        files when they reflect the store's generation, rebuilt from the store otherwise.

        A directory this process cannot write (a read-only mount of a built index) is served
        read-only: nothing is written there, what lags is rebuilt in memory, writes are refused
        (``read_only``: force it either way; None: ask the file system).
        """
        if read_only is None:
            read_only = not os.access(index_dir, os.W_OK)
        if not (index_dir / STORE_FILE).is_file():
            if read_manifest(index_dir) is None:
                raise ConfigurationError(
                    f"no index at {index_dir}; run `gainrag index build` (or `make prepare`)",
                    code="index_missing",
                )
            migrate_v1(index_dir)
        store = PassageStore.open(index_dir / STORE_FILE, read_only=read_only, immutable=read_only)
        manifest = store.meta()
        if manifest.get("format") != INDEX_FORMAT or "version" not in manifest:
            store.close()
            raise ConfigurationError(
                f"index at {index_dir} has format {manifest.get('format')}, not {INDEX_FORMAT}; "
                "rebuild it with `gainrag index build --force`"
            )
        with store.snapshot():  # one committed state, though another process writes meanwhile
            manifest = store.meta()
            rows = store.passages()
            cpu = _load_faiss(index_dir, store, manifest, len(rows[0]), save=not read_only)
            lex = _load_lexical(index_dir, store, manifest, read_only) if lexical else None
        return cls(index_dir, store, cpu, manifest, lex, rows, use_gpu=use_gpu)

    def claim_writer(self) -> None:
        """Make this process the index's one writer (an exclusive lock file, kept until close).

        Two writing processes would each keep FAISS and BM25 in step with their own writes only;
        the second one is refused instead (503), as is any write to a read-only index.
        """
        if self.read_only:
            raise UnavailableError(
                f"the index at {self.index_dir} is read-only here (a read-only mount): "
                "documents are written where it is mounted writable",
                code="index_read_only",
            )
        if self._writer_fd is not None:
            return
        fd = os.open(self.index_dir / WRITER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UnavailableError(
                f"another process writes the index at {self.index_dir}; send documents there",
                code="index_writer_busy",
            ) from None
        self._writer_fd = fd

    def close(self) -> None:
        """Write the FAISS file if writes made it lag, and close the store and BM25."""
        with self._lock:
            if self._dirty:
                _save_faiss(self.index_dir, self._cpu, self.generation, self.version)
                self._dirty = False
            if self.lexical is not None:
                self.lexical.close()
                self.lexical = None  # a late search (picked up before a swap) goes dense-only
            self.store.close()
            if self._writer_fd is not None:  # last: the files are written when another writes
                os.close(self._writer_fd)  # releases the flock
                self._writer_fd = None

    # -- reads ------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        texts: Sequence[str] | None = None,
        fusion: Fusion | None = None,
    ) -> list[list[Retrieved]]:
        """Top-k passages per query vector, best first: dense only, or fused with BM25 over
        ``texts`` when ``fusion`` is given (and this index has BM25)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            lexical_index = self.lexical  # read under the lock: close() clears it
            hybrid = fusion is not None and texts is not None and lexical_index is not None
            depth = max(k, fusion.depth) if hybrid and fusion is not None else k
            depth = min(depth, len(self._by_fid))
            if depth == 0:
                return [[] for _ in range(len(queries))]
            scores, ids = self._search_index.search(queries, depth)
            dense = [
                [(int(i), float(s)) for i, s in zip(row_ids, row_s, strict=True) if i >= 0]
                for row_ids, row_s in zip(ids, scores, strict=True)
            ]
            if hybrid:
                assert fusion is not None and texts is not None and lexical_index is not None
                lexical = lexical_index.search(texts, depth)
                if fusion.method == "rrf":
                    fused = [
                        rrf([d, x], k, c=fusion.rrf_c) for d, x in zip(dense, lexical, strict=True)
                    ]
                else:
                    fused = [
                        minmax_mix(d, x, k, weight=fusion.weight)
                        for d, x in zip(dense, lexical, strict=True)
                    ]
                if fusion.score == "dense":
                    fused = [
                        self._dense_scores(q, d, row)
                        for q, d, row in zip(queries, dense, fused, strict=True)
                    ]
            else:
                fused = [row[:k] for row in dense]
            by_fid = self._by_fid
            return [
                [Retrieved(by_fid[f], rank, s) for rank, (f, s) in enumerate(row)] for row in fused
            ]

    def _dense_scores(
        self, query: np.ndarray, dense: list[tuple[int, float]], fused: list[tuple[int, float]]
    ) -> list[tuple[int, float]]:
        """The fused order with each passage's cosine to the query as its score (a BM25-only hit
        has no dense score yet: its stored vector gives it). Called under the lock."""
        known = dict(dense)
        out = []
        for fid, _ in fused:
            score = known.get(fid)
            if score is None:
                score = float(self._cpu.reconstruct(fid) @ query)
            out.append((fid, score))
        return out

    def position(self, passage_id: str) -> int | None:
        """The passage's id in FAISS (its store fid), or None if it is not indexed."""
        return self._fid.get(passage_id)

    def get(self, passage_id: str) -> Passage | None:
        """The indexed passage of this id, or None."""
        fid = self._fid.get(passage_id)
        return None if fid is None else self._by_fid.get(fid)

    def vectors_of(self, passage_ids: Sequence[str]) -> np.ndarray | None:
        """The stored vectors of these passages (float32, one row each), or None if any is not
        indexed."""
        if not passage_ids:
            return np.empty((0, int(self.manifest["dim"])), dtype=np.float32)
        with self._lock:  # ids and vectors read in one state (a write may remove them)
            fids: list[int] = []
            for pid in passage_ids:
                fid = self._fid.get(pid)
                if fid is None:
                    return None
                fids.append(fid)
            return np.stack([self._cpu.reconstruct(f) for f in fids]).astype(np.float32)

    @property
    def passages(self) -> list[Passage]:
        """Every indexed passage, in fid order (a copy: offline jobs iterate it)."""
        with self._lock:
            return [self._by_fid[f] for f in sorted(self._by_fid)]

    # -- writes -----------------------------------------------------------------------------

    def apply(self, change: Change) -> None:
        """Make a committed store change searchable: FAISS and BM25 in one step under the lock."""
        if change.empty:
            return
        with self._lock:
            if change.removed:
                self._cpu.remove_ids(np.asarray(change.removed, dtype=np.int64))
                for fid in change.removed:
                    p = self._by_fid.pop(fid, None)
                    if p is not None:
                        self._fid.pop(p.id, None)
            if change.added:
                assert change.added_vectors is not None
                fids = np.asarray([f for f, _ in change.added], dtype=np.int64)
                self._cpu.add_with_ids(
                    np.ascontiguousarray(change.added_vectors, dtype=np.float32), fids
                )
                for fid, p in change.added:
                    self._by_fid[fid] = p
                    self._fid[p.id] = fid
            if self.lexical is not None:
                try:
                    self.lexical.apply(
                        [(f, p.title, p.text) for f, p in change.added],
                        change.removed,
                        change.generation,
                    )
                except Exception:
                    # The store has the change (acknowledged below), so BM25 must not lag behind
                    # FAISS while serving: a copy in memory, rebuilt from the store, serves
                    # from now on; its directory lags (its generation says so) and is rebuilt
                    # at the next start.
                    log.exception("BM25 update failed; serving a copy rebuilt in memory")
                    from gainrag.retrieval.lexical import LexicalIndex

                    memory = LexicalIndex.in_memory(tokenizer=self.lexical.tokenizer)
                    memory.replace_all(_lexical_rows(self.store), change.generation)
                    self.lexical.close()
                    self.lexical = memory
            if self.on_gpu:
                # GPU flat indexes cannot remove ids; a fresh copy is cheap at this size
                self._search_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._cpu)
            self.manifest = {
                **self.manifest,
                "generation": change.generation,
                "version": change.version,
                "count": len(self._by_fid),
            }
            self._dirty = True

    def save(self) -> None:
        """Write the FAISS file now if writes made it lag (else it is written at close)."""
        with self._lock:
            if self._dirty:
                _save_faiss(self.index_dir, self._cpu, self.generation, self.version)
                self._dirty = False


def _lexical_rows(store: PassageStore) -> Iterator[tuple[int, str, str]]:
    fids, passages, _ = store.passages()
    for fid, p in zip(fids, passages, strict=True):
        yield fid, p.title, p.text


def _load_faiss(
    index_dir: Path, store: PassageStore, manifest: dict[str, Any], count: int, *, save: bool
) -> Any:
    stamp_path = index_dir / FAISS_STAMP
    generation = int(manifest.get("generation", 0))
    try:
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("generation") == generation and stamp.get("version") == manifest["version"]:
            index = faiss.read_index(str(index_dir / FAISS_FILE))
            if isinstance(index, faiss.IndexIDMap2) and index.ntotal == count:
                return index
    except (OSError, ValueError, RuntimeError) as exc:
        # a derived file: unreadable or torn, it is rebuilt from the store, never fatal
        log.warning("FAISS file at %s not usable (%s); rebuilding it", index_dir, exc)
    # the FAISS file lags the store (a crash after a commit, or a fresh build): derive it again
    t = time.perf_counter()
    fids, vectors = store.vectors(int(manifest["dim"]))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(manifest["dim"])))
    if len(fids):
        index.add_with_ids(vectors, fids)
    if save:
        _save_faiss(index_dir, index, generation, version=str(manifest["version"]))
    log.info(
        "FAISS rebuilt from the store at %s: %d passages, generation %d, %.2f s",
        index_dir,
        len(fids),
        generation,
        time.perf_counter() - t,
    )
    return index


def _save_faiss(index_dir: Path, index: Any, generation: int, version: str) -> None:
    # The file first, then its stamp, each written whole (fsync) and renamed into place; names
    # of this process's own, so two processes never write one temporary file. A crash in
    # between leaves an old stamp, which only costs a rebuild from the store at the next start.
    tmp = index_dir / f"{FAISS_FILE}.{os.getpid()}.tmp"
    faiss.write_index(index, str(tmp))
    _fsync(tmp)
    os.replace(tmp, index_dir / FAISS_FILE)
    stamp = index_dir / f"{FAISS_STAMP}.{os.getpid()}.tmp"
    stamp.write_text(json.dumps({"generation": generation, "version": version}))
    _fsync(stamp)
    os.replace(stamp, index_dir / FAISS_STAMP)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_lexical(
    index_dir: Path, store: PassageStore, manifest: dict[str, Any], read_only: bool
) -> LexicalIndex:
    from gainrag.retrieval.lexical import LexicalIndex

    generation, count = int(manifest.get("generation", 0)), int(manifest["count"])
    path = index_dir / LEXICAL_DIR
    lexical = LexicalIndex.open_existing(path) if read_only else LexicalIndex.open(path)
    if lexical is not None and lexical.generation == generation and len(lexical) == count:
        return lexical
    t = time.perf_counter()
    where = "its directory"
    try:
        if lexical is None:
            raise PermissionError("read-only")
        lexical.replace_all(_lexical_rows(store), generation)
        # tantivy's writer lock goes with it: the process that writes documents may be another
        lexical.release_writer()
    except (PermissionError, ValueError) as exc:
        # read-only, or another process holds the writer lock (it will bring the files up to
        # date): this process searches a copy in memory (~0.4 s per 10^4 passages)
        if lexical is not None:
            lexical.close()
        where = f"memory ({exc})"
        lexical = LexicalIndex.in_memory()
        lexical.replace_all(_lexical_rows(store), generation)
    log.info(
        "BM25 rebuilt from the store at %s in %s: %d passages, %.2f s",
        index_dir,
        where,
        len(lexical),
        time.perf_counter() - t,
    )
    return lexical
