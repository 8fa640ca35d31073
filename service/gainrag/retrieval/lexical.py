"""Incremental BM25 over passages (title + text), on tantivy.

A directory holds tantivy's segment files and ``lexical.json``: the format, the tokenizer and
the store generation that the last commit reflects. Documents are keyed by ``fid`` (the int64 id
the dense index uses), so every change is an upsert or a delete by term and needs no rebuild.

Crash safety of the generation: the sidecar is replaced (write, fsync, rename) only AFTER
tantivy's commit returns; the Python binding does not expose tantivy's commit payload. After a
``kill -9`` the sidecar therefore holds the new generation or the previous one, never a newer
one than the index. When it lags, the index already holds that commit's changes; replaying them
is harmless because :meth:`LexicalIndex.apply` is idempotent (an added fid first deletes any
older copy, removing a missing fid is a no-op), so the owner's "catch up from ``generation``" or
a rebuild both end in the right state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import tantivy

log = logging.getLogger(__name__)

FORMAT = 1
SIDECAR = "lexical.json"
Tokenizer = Literal["en_stem", "default"]

# 2 cores: one indexing thread; the heap is a budget (tantivy's arena grows on demand), 11.8k
# passages need about 20 MB of it, and 50 MB keeps a full rebuild in one segment.
WRITER_THREADS = 1
WRITER_HEAP = 50_000_000


def _analyzer(tokenizer: Tokenizer) -> tantivy.TextAnalyzer:
    """tantivy's ``en_stem`` / ``default`` chain, built here so that indexing and query parsing
    use one analyzer object (registered under our own name on every open)."""
    b = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    b = b.filter(tantivy.Filter.remove_long(40)).filter(tantivy.Filter.lowercase())
    if tokenizer == "en_stem":
        b = b.filter(tantivy.Filter.stemmer("english"))
    return b.build()


def _schema(tokenizer: Tokenizer) -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    # indexed for delete-by-term, fast to read a hit's fid without stored-document decoding
    sb.add_integer_field("fid", indexed=True, fast=True)
    # One field of title + text: on the shipped dev sets BM25 over the concatenation beat
    # separate title/text fields at every cut-off (title boosts 0.5, 1 and 2 tried). Frequencies
    # only: no phrase queries, so positions would be dead weight.
    sb.add_text_field("body", tokenizer_name=f"gainrag_{tokenizer}", index_option="freq")
    return sb.build()


def _write_sidecar(path: Path, state: dict[str, Any]) -> None:
    """Replace ``path/lexical.json`` atomically and durably."""
    tmp = path / (SIDECAR + ".tmp")
    with tmp.open("w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / SIDECAR)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _check_generation(generation: int) -> None:
    if generation < 0:  # -1 means "unknown" on open
        raise ValueError(f"generation must be >= 0, got {generation}")


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


class LexicalIndex:
    """BM25 (tantivy: k1 1.2, b 0.75) over ``title + "\\n" + text``, keyed by fid.

    One writer per directory (tantivy's lock file), taken at the first write, so processes that
    only search (a second gateway on the same index, a read-only mount) can open it too.
    ``search`` may run in any thread while ``apply`` or ``replace_all`` runs in another; writes
    take turns. ``path`` None: in memory (:meth:`in_memory`), nothing persisted.
    """

    def __init__(
        self, path: Path | None, index: tantivy.Index, tokenizer: Tokenizer, generation: int
    ) -> None:
        self.path = path
        self.tokenizer: Tokenizer = tokenizer
        self.generation = generation
        self._index = index
        self._schema = index.schema
        self._analyzer = _analyzer(tokenizer)
        index.register_tokenizer(f"gainrag_{tokenizer}", self._analyzer)
        # manual: the reader moves only when we reload right after our own commit, so the next
        # search sees it (the default policy reloads later, from a file watcher thread)
        index.config_reader(reload_policy="manual")
        index.reload()
        self._writer: tantivy.IndexWriter | None = None
        self._closed = False
        self._write_lock = threading.Lock()

    @classmethod
    def in_memory(cls, *, tokenizer: Tokenizer = "en_stem") -> LexicalIndex:
        """An empty index in RAM (generation -1): for a read-only or locked directory."""
        return cls(None, tantivy.Index(_schema(tokenizer)), tokenizer, -1)

    @classmethod
    def open_existing(cls, path: Path, *, tokenizer: Tokenizer = "en_stem") -> LexicalIndex | None:
        """Open the index at ``path`` without creating or changing anything (a read-only
        directory); None if there is no usable one."""
        state = _read_sidecar(path)
        if (
            state is None
            or state.get("format") != FORMAT
            or state.get("tokenizer") != tokenizer
            or not isinstance(state.get("generation"), int)
            or not tantivy.Index.exists(str(path))
        ):
            return None
        try:
            return cls(path, tantivy.Index.open(str(path)), tokenizer, state["generation"])
        except ValueError:
            return None

    @classmethod
    def open(cls, path: Path, *, tokenizer: Tokenizer = "en_stem") -> LexicalIndex:
        """Open the index at ``path``; create it (generation -1) if missing, unreadable, of
        another format or tokenizer, or without a sidecar (a crash before the first one)."""
        path.mkdir(parents=True, exist_ok=True)
        state = _read_sidecar(path)
        if (
            state is not None
            and state.get("format") == FORMAT
            and state.get("tokenizer") == tokenizer
            and isinstance(state.get("generation"), int)
            and tantivy.Index.exists(str(path))
        ):
            try:
                return cls(path, tantivy.Index.open(str(path)), tokenizer, state["generation"])
            except ValueError as exc:  # corrupt or incompatible files: rebuild from the store
                log.warning("lexical index at %s unreadable (%s); starting a new one", path, exc)
        for entry in path.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        index = tantivy.Index(_schema(tokenizer), path=str(path), reuse=False)
        _write_sidecar(path, {"format": FORMAT, "tokenizer": tokenizer, "generation": -1})
        return cls(path, index, tokenizer, -1)

    # ------------------------------------------------------------------ writes

    def replace_all(self, rows: Iterable[tuple[int, str, str]], generation: int) -> None:
        """Replace every document by ``rows`` (fid, title, text) in one commit."""
        _check_generation(generation)
        with self._write_lock:
            writer = self._live_writer()
            seen: set[int] = set()
            try:
                writer.delete_all_documents()
                for fid, title, text in rows:
                    if fid in seen:
                        raise ValueError(f"fid {fid} appears twice")
                    seen.add(fid)
                    writer.add_document(self._doc(fid, title, text))
            except BaseException:
                writer.rollback()  # nothing of a failed rebuild may ride along the next commit
                raise
            self._commit(writer, generation)

    def apply(
        self, add: Sequence[tuple[int, str, str]], remove: Sequence[int], generation: int
    ) -> None:
        """Delete ``remove`` and then upsert ``add`` (fid, title, text), in one commit.

        Idempotent: an added fid replaces any document with that fid, removing an absent fid
        does nothing, so replaying changes after a lagging generation is safe.
        """
        fids = [fid for fid, _, _ in add]
        if len(set(fids)) != len(fids):
            raise ValueError("an fid appears twice in add")
        _check_generation(generation)
        with self._write_lock:
            writer = self._live_writer()
            try:
                # a delete only hits documents added before it (tantivy orders by opstamp), so
                # deleting first and adding after keeps the new copies
                for fid in {*remove, *fids}:
                    writer.delete_documents_by_term("fid", fid)
                for fid, title, text in add:
                    writer.add_document(self._doc(fid, title, text))
            except BaseException:
                writer.rollback()
                raise
            self._commit(writer, generation)

    def _doc(self, fid: int, title: str, text: str) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_integer("fid", fid)
        doc.add_text("body", f"{title}\n{text}" if title else text)
        return doc

    def _commit(self, writer: tantivy.IndexWriter, generation: int) -> None:
        writer.commit()
        self._index.reload()
        if self.path is not None:
            state = {"format": FORMAT, "tokenizer": self.tokenizer, "generation": generation}
            _write_sidecar(self.path, state)
        self.generation = generation

    def _live_writer(self) -> tantivy.IndexWriter:
        if self._closed:
            raise RuntimeError(f"lexical index at {self.path} is closed")
        if self._writer is None:
            # raises ValueError while another process holds the directory's writer lock
            self._writer = self._index.writer(heap_size=WRITER_HEAP, num_threads=WRITER_THREADS)
        return self._writer

    # ------------------------------------------------------------------ reads

    def query_terms(self, query: str) -> list[str]:
        """The distinct analysed terms of ``query``, in order of first appearance."""
        return list(dict.fromkeys(self._analyzer.analyze(query)))

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` (fid, BM25 score), best first; equal scores by fid, also at the
        cut.

        All queries read one searcher snapshot. A query is an OR of term queries over its
        analysed words, built here rather than by tantivy's query parser: user questions carry
        quotes, colons, parentheses, AND/OR/NOT and ``field:`` look-alikes, which the parser
        would read as syntax (or reject), while the analyser only ever yields plain terms. Each
        distinct term counts once; a question with no terms left matches nothing.
        """
        if self._closed:
            raise RuntimeError(f"lexical index at {self.path} is closed")
        searcher = self._index.searcher()
        out: list[list[tuple[int, float]]] = []
        for text in queries:
            terms = self.query_terms(text)
            if not terms or k <= 0:
                out.append([])
                continue
            query = tantivy.Query.boolean_query(
                [
                    (
                        tantivy.Occur.Should,
                        tantivy.Query.term_query(self._schema, "body", t, index_option="freq"),
                    )
                    for t in terms
                ]
            )
            out.append(self._top(searcher, query, k))
        return out

    @staticmethod
    def _top(searcher: tantivy.Searcher, query: tantivy.Query, k: int) -> list[tuple[int, float]]:
        # tantivy breaks score ties by segment and doc order, which depends on the write
        # history; so that equal contents give equal results, fetch past the k-th score's ties
        # and rank those by fid
        limit = k + 1
        while True:
            hits = searcher.search(query, limit, count=False).hits
            if len(hits) < limit or hits[-1][0] < hits[k - 1][0]:
                break
            limit *= 2
        # every document has exactly one fid, so the fast field never answers None
        fids = cast(list[int], searcher.fast_field_values("fid", [addr for _, addr in hits]))
        ranked = [(f, float(s)) for (s, _), f in zip(hits, fids, strict=True)]
        ranked.sort(key=lambda h: (-h[1], h[0]))
        return ranked[:k]

    def __len__(self) -> int:
        """Live (not deleted) documents in the last committed state."""
        return int(self._index.searcher().num_docs)

    def release_writer(self) -> None:
        """Finish merges and let go of the writer (and the directory's lock) until the next
        write takes it again."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.wait_merging_threads()
                self._writer = None

    def close(self) -> None:
        """Finish background merges and release the writer lock; idempotent."""
        with self._write_lock:
            self._closed = True
            if self._writer is not None:
                self._writer.wait_merging_threads()
                self._writer = None
