"""``gainrag train selector-data``: gain signals -> distillation groups.

Each candidate gets the label v = -log(ppl + 1) (higher is better). A group holds the best
candidate as the positive and ``group_size - 1`` others as negatives, with their labels as
teacher scores, in FlagEmbedding's reranker format:
``{"query", "pos": [text], "neg": [texts], "pos_scores": [v], "neg_scores": [vs]}``.
Texts are the selector's view of a candidate, ``title\\ntext``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gainrag.config import Settings
from gainrag.training.registry import Job


def gain_label(ppl: float) -> float:
    """v = -log(ppl + 1)."""
    return -math.log(ppl + 1.0)


def make_group(row: dict[str, Any], group_size: int, rng: random.Random) -> dict[str, Any] | None:
    """One training group from one question's gain signals (None if it has < 2 candidates)."""
    cands = [c for c in row["candidates"] if math.isfinite(c["ppl"])]
    if len(cands) < 2:
        return None
    labelled = sorted(
        ((gain_label(c["ppl"]), f"{c['title']}\n{c['text']}") for c in cands),
        key=lambda x: -x[0],
    )
    pos, rest = labelled[0], labelled[1:]
    need = group_size - 1
    # Enough negatives: sample without replacement; too few: with replacement (FlagEmbedding does
    # the same), so every group has the same size.
    negs = rng.sample(rest, need) if len(rest) >= need else rng.choices(rest, k=need)
    return {
        "query": row["question"],
        "pos": [pos[1]],
        "neg": [t for _, t in negs],
        "pos_scores": [pos[0]],
        "neg_scores": [v for v, _ in negs],
    }


def iter_groups(path: Path, group_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Groups for every question of a gain-signals file."""
    rng = random.Random(seed)
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                group = make_group(json.loads(line), group_size, rng)
                if group is not None:
                    yield group


def write_groups(src: Path, out: Path, *, group_size: int = 16, seed: int = 0) -> int:
    """Write the groups of ``src`` to ``out`` (JSONL); returns how many."""
    if group_size < 2:
        raise ValueError("group_size must be at least 2 (one positive, one negative)")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for group in iter_groups(src, group_size, seed):
            f.write(json.dumps(group, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    return n


class SelectorData(Job):
    """``gainrag train selector-data``."""

    name = "selector-data"
    summary = "gain signals -> distillation groups (the distill recipe's input)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", type=Path, required=True, help="gain-signals JSONL")
        parser.add_argument("--output", type=Path, required=True, help="groups JSONL")
        parser.add_argument("--group-size", type=int, default=16)
        parser.add_argument("--seed", type=int, default=0)

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        n = write_groups(args.input, args.output, group_size=args.group_size, seed=args.seed)
        print(f"selector data: {n} groups of {args.group_size} -> {args.output}")


JOB = SelectorData()
