"""The signal jobs' resumable loop (``training/shard_loop.py``), without models: a job killed
mid-shard resumes where it stopped, a torn last line is redone, nothing finished is redone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gainrag.training.shard_loop import (
    ShardLoop,
    finished_ids,
    jsonl_rows,
    publish,
    replacing,
    row_id,
    take_shard,
)

ITEMS = [{"id": f"q{i}", "question": f"question {i}"} for i in range(10)]


class Killed(Exception):
    """The job stopped (as by a kill) in the middle of its shard."""


def job(
    out: Path,
    shard: tuple[int, int] = (0, 1),
    *,
    kill_after: int | None = None,
    batch: int = 3,
) -> tuple[ShardLoop[dict[str, Any]], list[str]]:
    """A signal job in miniature: the loop as gain-signals and rationales run it; the ids it
    worked on (so a test sees what was redone)."""
    loop = ShardLoop.over_jsonl(ITEMS, out, row_id, shard=shard)
    worked: list[str] = []
    with loop.appending(out, desc="test", show_progress=False) as sink:
        for _, items in loop.batches(batch):
            for q in items:
                if kill_after is not None and len(worked) == kill_after:
                    raise Killed
                worked.append(q["id"])
                sink.append({"id": q["id"], "answer": q["question"].upper()})
    return loop, worked


def ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in out.read_text().splitlines()]


def test_a_killed_job_resumes_mid_shard_and_redoes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    with pytest.raises(Killed):
        job(out, kill_after=4)  # in the middle of the second batch of 3
    assert ids(out) == ["q0", "q1", "q2", "q3"]
    loop, worked = job(out)
    assert loop.skipped == 4 and len(loop.items) == 10
    assert worked == [f"q{i}" for i in range(4, 10)]  # only what was left
    assert ids(out) == [f"q{i}" for i in range(10)]
    loop, worked = job(out)  # finished: nothing to do, nothing written
    assert loop.todo == [] and worked == [] and loop.skipped == 10
    assert ids(out) == [f"q{i}" for i in range(10)]


def test_a_torn_last_line_is_dropped_and_its_item_redone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        job(out, kill_after=2)
    with out.open("a") as f:
        f.write('{"id": "q2", "answ')  # killed in the middle of writing q2's row
    assert finished_ids(out) == {"q0", "q1"}
    assert out.read_text().count("\n") == 2  # repaired in place: appends start on a clean line
    _, worked = job(out)
    assert worked == [f"q{i}" for i in range(2, 10)]
    rows, torn = jsonl_rows(out)
    assert torn == 0 and [r["id"] for r in rows] == [f"q{i}" for i in range(10)]
    assert rows[2] == {"id": "q2", "answer": "QUESTION 2"}


def test_shards_split_the_work_and_share_one_output(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert take_shard(ITEMS, (1, 3)) == [ITEMS[1], ITEMS[4], ITEMS[7]]
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        take_shard(ITEMS, (2, 2))
    with pytest.raises(Killed):
        job(out, (1, 2), kill_after=2)  # process 1 of 2 stops after q1, q3
    _, first = job(out, (0, 2))
    assert first == ["q0", "q2", "q4", "q6", "q8"]
    loop, second = job(out, (1, 2))
    assert loop.skipped == 2 and second == ["q5", "q7", "q9"]
    assert sorted(ids(out)) == sorted(q["id"] for q in ITEMS)


def test_items_done_meanwhile_are_skipped_and_the_eta_counts_the_rest(tmp_path: Path) -> None:
    """As gain-shards runs it: an item is a shard file, done when the file exists."""
    done = {0, 3}
    loop = ShardLoop(range(8), lambda s: s in done)
    assert loop.todo == [1, 2, 4, 5, 6, 7] and loop.skipped == 2
    seen = []
    for pos, (s,) in loop.batches(1):
        seen.append((pos, s))
        done.add(s)
        done.add(5)  # another process finishes shard 5 meanwhile
    assert seen == [(0, 1), (1, 2), (2, 4), (4, 6), (5, 7)]
    # after the item at position 1 of 6, 120 s spent: 4 left at 60 s each
    assert loop.eta(1, 120.0, "shards") == "4 shards left, ~4 min"


def test_publish_never_overwrites_a_finished_shard(tmp_path: Path) -> None:
    out = tmp_path / "shard-0000.jsonl"
    assert publish(out, "first\n")
    assert not publish(out, "second\n")  # another process got there first: theirs is kept
    assert out.read_text() == "first\n" and sorted(tmp_path.iterdir()) == [out]


def test_replacing_leaves_the_old_output_when_the_writer_dies(tmp_path: Path) -> None:
    out = tmp_path / "groups.jsonl"
    out.write_text("old\n")
    with pytest.raises(Killed), replacing(out) as f:
        f.write("half of the new\n")
        raise Killed
    assert out.read_text() == "old\n"
    with replacing(out) as f:
        f.write("new\n")
    assert out.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["groups.jsonl"]  # the temp file went in
