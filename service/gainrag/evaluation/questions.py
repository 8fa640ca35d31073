"""Question files (JSONL): the one reader for evaluation, training, benchmarks and load tests.

Kept free of model imports so that a load generator can read questions without loading torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gainrag.errors import ConfigurationError
from gainrag.types import Passage


def load_questions(
    path: Path, limit: int | None = None, *, answers: bool = True
) -> list[dict[str, Any]]:
    """The first ``limit`` rows with ``question`` (and ``answers``, a list, unless ``answers`` is
    false: benchmarks and load tests only ask), plus optional ``gold_ids``; ``id`` defaults to the
    line number."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            bad_answers = answers and not isinstance(row.get("answers"), list)
            if not isinstance(row.get("question"), str) or bad_answers:
                need = "'question' and 'answers' (list)" if answers else "'question'"
                raise ConfigurationError(f"{path}:{lineno}: needs {need}")
            row.setdefault("id", str(lineno))
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def passage_pool(corpus: Path, questions: list[dict[str, Any]], others: int) -> list[Passage]:
    """The questions' gold passages plus the first ``others`` other passages of ``corpus``, in
    corpus order: a small candidate pool where every question's answer is present."""
    gold = {g for q in questions for g in q["gold_ids"]}
    pool: list[Passage] = []
    taken = 0
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] in gold or taken < others:
                taken += row["id"] not in gold
                pool.append(Passage(row["id"], row["title"], row["text"]))
    return pool
