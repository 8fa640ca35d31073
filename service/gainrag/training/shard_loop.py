"""The signal jobs' resumable loop: this process's shard of the work, what is done, the rest.

The signal jobs run for hours and get killed; each resumes where it stopped, the same way:

* **shard**: ``--shard I/N`` keeps every N-th work item from the I-th (:func:`take_shard`), so N
  processes split the work without talking to each other;
* **skip what is done**: :class:`ShardLoop` leaves out the items whose result is in the output
  already: an id in a JSONL file (:meth:`ShardLoop.over_jsonl`, :func:`finished_ids`) or a shard
  file that exists (``gain-shards``); an item finished by another process while this one runs is
  left out too;
* **write atomically**: a JSONL row is one write under an exclusive file lock, flushed
  (:class:`JsonlAppender`): a kill loses at most the row being written, and the torn last line it
  leaves is dropped by the next run's :func:`finished_ids`; a whole file is written aside and
  renamed into place (:func:`replacing`) or hard-linked, failing if it exists (:func:`publish`);
* **report progress**: a bar over the shard's items that starts at those already done
  (:meth:`ShardLoop.appending`), or per batch the items left and their time
  (:meth:`ShardLoop.eta`).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

T = TypeVar("T")
Row = dict[str, Any]


def take_shard(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Every n-th item from the i-th, for ``shard = (i, n)``: process i of n's part of the work."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} is outside 0..{n - 1}")
    return list(items[i::n])


@contextmanager
def locked(f: IO[str]) -> Iterator[None]:
    """An exclusive lock on an open output file, taken by every shard's reads and writes."""
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def row_id(row: Row) -> str:
    """A work item's or output row's id, as the outputs key them."""
    return str(row["id"])


def _parse(line: str) -> Row | None:
    """A JSONL line as a row with an ``id``; None for a torn or foreign line."""
    try:
        row = json.loads(line)
        row_id(row)
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return row if isinstance(row, dict) else None


def jsonl_rows(path: Path) -> tuple[list[Row], int]:
    """The rows of a JSONL output (each with an ``id``), and how many lines were torn."""
    rows: list[Row] = []
    torn = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row = _parse(line)
        if row is None:
            torn += 1
        else:
            rows.append(row)
    return rows, torn


def finished_ids(path: Path) -> set[str]:
    """Ids already in an output file; drops a torn last line left by an interrupted write.

    Reads and repairs under the same lock the writers take, in place (same inode), so a shard
    appending from another process neither shows up half-written nor loses later lines.
    """
    if not path.exists():
        return set()
    ids: set[str] = set()
    with path.open("r+", encoding="utf-8") as f, locked(f):
        good: list[str] = []
        torn = False
        for line in f.read().splitlines():
            row = _parse(line)
            if row is None:
                torn = True
            else:
                ids.add(row_id(row))
                good.append(line)
        if torn:  # rewrite without the broken line so appends start on a clean line
            f.seek(0)
            f.write("".join(line + "\n" for line in good))
            f.truncate()
            f.flush()
    return ids


class JsonlAppender:
    """Rows appended to a JSONL output that other processes (other shards) append to as well."""

    def __init__(self, f: IO[str], bar: tqdm[Any]) -> None:
        self.f, self.bar = f, bar
        self.written = 0

    def append(self, row: Row) -> None:
        """Write one row as one line, under the file lock, flushed: a crash loses at most it."""
        with locked(self.f):
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.f.flush()
        self.written += 1
        self.bar.update(1)


def publish(out: Path, text: str) -> bool:
    """Write ``out`` whole, only if no other process has: a unique temp file, then a hard link
    (which fails if ``out`` exists). Returns whether this call wrote it."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, out)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@contextmanager
def replacing(out: Path) -> Iterator[IO[str]]:
    """A file to write ``out``'s new contents to; it replaces ``out`` once complete (a temp file
    beside it, renamed), so a killed job leaves the old output, never half of a new one."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        yield f
    tmp.replace(out)


class ShardLoop(Generic[T]):
    """One process's pass over its shard of a job's work items, skipping what the output has.

    ``items`` is the shard (every n-th item), ``todo`` what was not done when the run started;
    ``done(item)`` is asked again before each batch (another process may have finished it).
    """

    def __init__(
        self, items: Sequence[T], done: Callable[[T], bool], *, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.items = take_shard(items, shard)
        self.done = done
        self.todo = [x for x in self.items if not done(x)]

    @classmethod
    def over_jsonl(
        cls,
        items: Sequence[T],
        out: Path,
        key: Callable[[T], str],
        *,
        shard: tuple[int, int] = (0, 1),
    ) -> ShardLoop[T]:
        """Items whose ``key`` (an id) is not in the JSONL ``out`` yet (a torn last line there is
        dropped: its item is redone)."""
        finished = finished_ids(out)
        return cls(items, lambda x: key(x) in finished, shard=shard)

    @property
    def skipped(self) -> int:
        """Items of the shard that were done when the run started."""
        return len(self.items) - len(self.todo)

    def batches(self, size: int) -> Iterator[tuple[int, list[T]]]:
        """``(position in todo, batch)`` over the items left, ``size`` at a time, without those
        done meanwhile (a batch left empty is not yielded)."""
        for start in range(0, len(self.todo), size):
            batch = [x for x in self.todo[start : start + size] if not self.done(x)]
            if batch:
                yield start, batch

    def eta(self, pos: int, spent: float, unit: str) -> str:
        """After the item at ``pos`` of todo: ``"N <unit> left, ~M min"``, M from the seconds
        ``spent`` so far over the ``pos + 1`` items passed."""
        left = len(self.todo) - pos - 1
        return f"{left} {unit} left, ~{left * spent / (pos + 1) / 60:.0f} min"

    @contextmanager
    def appending(
        self, out: Path, *, desc: str, show_progress: bool = True
    ) -> Iterator[JsonlAppender]:
        """``out`` open for appending rows, with a progress bar over the shard (done ones
        counted)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            out.open("a", encoding="utf-8") as f,
            tqdm(
                total=len(self.items),
                initial=self.skipped,
                desc=desc,
                unit="q",
                disable=not show_progress,
            ) as bar,
        ):
            yield JsonlAppender(f, bar)
