"""Eval reports on disk: a small readable summary and its per-question records, gzipped.

``eval_<set>_<preset>.json`` keeps everything a table or a reviewer needs (command, models,
settings, machine, metrics, errors); in place of the records it names its sibling
``eval_<set>_<preset>.questions.jsonl.gz`` (one record per line) with their count and the
sha256 of the uncompressed lines. The records are over 99% of a report; gzipped they take ~1/8
of the old single file (a full squad_dev run: 602 KB -> 2 KB + 78 KB), and the summary still
diffs as text.

The bytes are a function of the report alone (gzip mtime 0 and no file name in the header, the
harness's key order, no timestamps), so writing the same report again leaves git clean.

Readers call ``load_report``: it returns the report with its records inline, from this layout or
from the older single JSON file with inline records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from gainrag.errors import ConfigurationError

RECORDS_SUFFIX = ".questions.jsonl.gz"


def records_path(summary: Path) -> Path:
    """The records file beside ``summary``: ``eval_x.json`` -> ``eval_x.questions.jsonl.gz``."""
    return summary.with_name(summary.name.removesuffix(".json") + RECORDS_SUFFIX)


def records_text(records: list[dict[str, Any]]) -> bytes:
    """The uncompressed JSONL of ``records``: one compact line each, UTF-8 (zcat-readable)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def split_report(path: Path, report: dict[str, Any]) -> tuple[str, bytes]:
    """The summary text and the gzipped records ``write_report`` puts at ``path`` and beside it."""
    records = report["records"]
    text = records_text(records)
    ref = {
        "file": records_path(path).name,
        "n": len(records),
        "sha256": hashlib.sha256(text).hexdigest(),
    }
    # {**report, "records": ref} keeps the key where the records were: loading restores the
    # report key for key, in order.
    summary = json.dumps({**report, "records": ref}, indent=2, ensure_ascii=False) + "\n"
    return summary, gzip.compress(text, compresslevel=9, mtime=0)


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as ``path`` (summary) and its records file; returns the records' path."""
    summary, packed = split_report(path, report)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = records_path(path)
    # Records first: a summary is never on disk before the file it points to.
    out.write_bytes(packed)
    path.write_text(summary)
    return out


def has_inline_records(report: dict[str, Any]) -> bool:
    """Whether ``report`` (as parsed from its .json) holds its records itself: the old layout."""
    return isinstance(report.get("records"), list)


def load_report(path: Path) -> dict[str, Any]:
    """The report at ``path`` with its records inline, from either layout."""
    report: dict[str, Any] = json.loads(path.read_text())
    ref = report.get("records")
    if not isinstance(ref, dict):  # the old layout (records inline), or no records at all
        return report
    src = path.with_name(ref["file"])
    try:
        text = gzip.decompress(src.read_bytes())
    except OSError as exc:  # missing, or not gzip
        raise ConfigurationError(f"{path}: cannot read its records {src}: {exc}") from exc
    # A summary and a records file from different runs would pair the wrong answers silently.
    if hashlib.sha256(text).hexdigest() != ref["sha256"]:
        raise ConfigurationError(f"{src} is not the records file of {path} (sha256 differs)")
    # split on b"\n" only: json.dumps escapes it inside strings, unlike other line breaks
    # (U+2028 ...) that str.splitlines would also cut at
    report["records"] = [json.loads(line) for line in text.split(b"\n") if line]
    return report
