"""``gainrag train merge-signals``: shard files of gain signals -> one file.

Pods of a Kubernetes Indexed Job each write their own shard file (``--shard I/N`` into
``...I.jsonl``): file locks are not to be trusted on network volumes, so shards never share a
file. This joins them: torn last lines (a pod killed mid-write) are dropped, a question that two
attempts of a shard both wrote is kept once, and a missing shard is an error, not a smaller file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gainrag.config import Settings
from gainrag.errors import ConfigurationError
from gainrag.training.registry import Job
from gainrag.training.shard_loop import jsonl_rows, replacing, row_id


def merge_signals(inputs: list[Path], out: Path, *, expect: int | None = None) -> dict[str, int]:
    """Write the rows of ``inputs`` (in order, first copy of each id) to ``out``; counts."""
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise ConfigurationError(f"missing shard files: {', '.join(missing)}")
    if expect is not None and len(inputs) != expect:
        raise ConfigurationError(f"expected {expect} shard files, got {len(inputs)}")
    seen: set[str] = set()
    torn = duplicates = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as f:
        for path in inputs:
            rows, torn_here = jsonl_rows(path)
            torn += torn_here
            for row in rows:
                qid = row_id(row)
                if qid in seen:
                    duplicates += 1
                    continue
                seen.add(qid)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"shards": len(inputs), "questions": len(seen), "torn": torn, "duplicates": duplicates}


class MergeSignals(Job):
    """``gainrag train merge-signals``."""

    name = "merge-signals"
    summary = "join per-shard gain-signal files (an Indexed Job's pods) into one file"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--inputs", type=Path, nargs="+", required=True, help="shard files")
        parser.add_argument("--output", type=Path, required=True, help="merged JSONL")
        parser.add_argument("--expect", type=int, help="fail unless exactly this many shards")

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        c = merge_signals(args.inputs, args.output, expect=args.expect)
        print(
            f"merge-signals: {c['questions']} questions from {c['shards']} shards "
            f"({c['torn']} torn lines, {c['duplicates']} duplicates dropped) -> {args.output}"
        )


JOB = MergeSignals()
