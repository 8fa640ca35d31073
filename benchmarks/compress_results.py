"""Keep benchmarks/results small: each eval report as a summary .json and its gzipped records.

An eval report (``gainrag eval --output``, ``benchmarks.bench_readers``) is a JSON object with a
``preset`` and its per-question ``records``. The old layout kept the records inline (~600 KB a
full-dev-set run); ``gainrag.evaluation.report`` writes them to ``X.questions.jsonl.gz`` beside
the summary ``X.json``. This converts old-layout reports in place, verifying each one: the
converted pair loads back to the same JSON, key for key, as the file it replaces (else the
original is put back and the run stops). Converting again changes nothing.

    python -m benchmarks.compress_results            # every report under benchmarks/results
    python -m benchmarks.compress_results PATH...    # these report files or directories
    python -m benchmarks.compress_results --check    # fail on an old-layout report, a summary
                                                     # whose records do not match, or files that
                                                     # are not the bytes write_report gives
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gainrag.config import REPO_ROOT
from gainrag.errors import ConfigurationError
from gainrag.evaluation.report import (
    has_inline_records,
    load_report,
    records_path,
    split_report,
    write_report,
)

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _parsed(path: Path) -> dict[str, Any] | None:
    """``path`` parsed if it is an eval report's .json (either layout), else None."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and "preset" in data and isinstance(data.get("records"), list | dict):
        return data
    return None


def find_reports(paths: list[Path]) -> list[Path]:
    """The eval reports' .json files in ``paths`` (files, or directories searched recursively)."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    return [f for f in files if _parsed(f) is not None]


def convert(path: Path) -> tuple[int, int] | None:
    """Rewrite an old-layout report at ``path`` in the new layout, verified; None if it already
    is. Returns (bytes before, bytes after: the summary and the records file)."""
    original = path.read_bytes()
    report = json.loads(original)
    if not has_inline_records(report):
        return None
    out = write_report(path, report)
    # The whole report, key order included, must come back: the records are the evidence behind
    # every published sign test.
    if json.dumps(load_report(path)) != json.dumps(report):
        path.write_bytes(original)
        out.unlink()
        raise SystemExit(f"{path}: the converted report does not load back the same; left as is")
    return len(original), path.stat().st_size + out.stat().st_size


def check(path: Path) -> str | None:
    """What is wrong with the report at ``path`` (None: new layout, consistent, canonical)."""
    if has_inline_records(json.loads(path.read_text())):
        return "records inline (old layout): run python -m benchmarks.compress_results"
    try:
        report = load_report(path)
    except ConfigurationError as exc:
        return exc.message
    summary, packed = split_report(path, report)
    if path.read_text() != summary or records_path(path).read_bytes() != packed:
        return "not the bytes write_report gives for its own data (edited by hand?)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Convert (or ``--check``) the reports; prints one line per report and the totals."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, default=[RESULTS])
    p.add_argument("--check", action="store_true", help="verify only, change nothing")
    a = p.parse_args(argv)
    reports = find_reports(a.paths)
    if a.check:
        problems = [(r, why) for r in reports if (why := check(r)) is not None]
        for r, why in problems:
            print(f"{r}: {why}", file=sys.stderr)
        print(f"{len(reports) - len(problems)} of {len(reports)} reports in the compressed layout")
        return 1 if problems else 0
    before = after = 0
    for r in reports:
        sizes = convert(r)
        if sizes is None:
            continue
        before, after = before + sizes[0], after + sizes[1]
        print(f"{r}: {sizes[0] / 1024:.0f} KiB -> {sizes[1] / 1024:.0f} KiB")
    print(f"converted: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
