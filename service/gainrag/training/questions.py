"""Training questions: seeded samples of question files, shared by the jobs that read them."""

from __future__ import annotations

import argparse
import random
from itertools import zip_longest
from pathlib import Path
from typing import Any

from gainrag.evaluation.questions import load_questions


def select_questions(path: Path, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Questions with at least one answer, in a seeded random order, the first ``limit``."""
    rows = [r for r in load_questions(path) if any(a.strip() for a in r["answers"])]
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


def training_questions(paths: list[Path], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Seeded samples of several files, interleaved so a partial run covers every file."""
    per_file = [select_questions(path, limit, seed) for path in paths]
    return [q for batch in zip_longest(*per_file) for q in batch if q is not None]


def question_args(parser: argparse.ArgumentParser, help_: str) -> None:
    """--questions FILE... and --limit, shared by the jobs that read training questions."""
    parser.add_argument("--questions", type=Path, nargs="+", required=True, help=help_)
    parser.add_argument("--limit", type=int, help="questions per file (seeded random sample)")
