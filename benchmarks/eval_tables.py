"""Print the README's quality tables from <dir>/eval_<set>_<preset>.json.

Under each table, the trained selectors are compared with the baselines question by question, on
acc (GainRAG's cover-EM) and on EM: how many questions each preset gets right where the baseline
does not (and the reverse), with the exact sign test's two-sided p.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gainrag.evaluation.harness import PRESETS, format_table
from gainrag.evaluation.qa_metrics import paired_em, record_acc

RESULTS = Path(__file__).parent / "results"
ORDER = [
    "closed-book",
    "retrieval",
    "rerank",
    "gainrag-no-pseudo",
    "gainrag",
    "radio",
    "radio-pseudo",
    "dro",
    "dro-pseudo",
]
# (preset, baseline) pairs worth a paired comparison: each selector against what it replaces.
PAIRS = [
    ("rerank", "retrieval"),
    ("gainrag-no-pseudo", "retrieval"),
    ("gainrag-no-pseudo", "rerank"),
    ("gainrag", "retrieval"),
    ("gainrag", "rerank"),
    ("gainrag", "gainrag-no-pseudo"),  # what the pseudo-passage does
    ("radio", "retrieval"),
    ("radio", "rerank"),
    ("dro", "retrieval"),
    ("dro", "rerank"),
    ("radio", "gainrag-no-pseudo"),
    ("dro", "gainrag-no-pseudo"),
    ("dro", "radio"),
    ("radio-pseudo", "gainrag"),
    ("dro-pseudo", "gainrag"),
]


METRICS = {"acc": "acc (cover-EM)", "em": "exact match"}


def scores_by_id(report: dict[str, Any], metric: str) -> dict[str, float]:
    """Question id -> 0/1 score; acc is recomputed for reports older than the metric."""
    if metric == "acc":
        return {r["id"]: record_acc(r) for r in report["records"]}
    return {r["id"]: float(r[metric]) for r in report["records"]}


def paired_table(reports: dict[str, dict[str, Any]], metric: str = "em") -> str:
    """A markdown table with one row per available (preset, baseline) pair ("" if none)."""
    rows = []
    for a, b in PAIRS:
        if a in reports and b in reports:
            wins, losses, p = paired_em(
                scores_by_id(reports[a], metric), scores_by_id(reports[b], metric)
            )
            rows.append(f"| `{a}` vs `{b}` | {wins} | {losses} | {p:.3f} |")
    if not rows:
        return ""
    head = [
        f"| {METRICS[metric]}, question by question | only the preset | only the baseline "
        "| sign test p |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def main() -> None:
    """One markdown table per dev set, presets in a fixed order, then the paired comparisons."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", default=["nq_dev", "squad_dev"])
    p.add_argument("--dir", type=Path, default=RESULTS, help="where the eval JSON files are")
    args = p.parse_args()
    assert set(ORDER) == set(PRESETS)
    for name in args.sets:
        reports = {}
        for preset in ORDER:
            path = args.dir / f"eval_{name}_{preset}.json"
            if path.exists():
                reports[preset] = json.loads(path.read_text())
        if reports:
            ks = sorted({r["settings"]["k"] for r in reports.values()})
            ns = sorted({r["n"] for r in reports.values()})
            print(f"**{name}** (n = {', '.join(map(str, ns))}, k = {', '.join(map(str, ks))}):\n")
            print(format_table(list(reports.values())))
            print()
            for metric in METRICS:
                paired = paired_table(reports, metric)
                if paired:
                    print(paired)
                    print()


if __name__ == "__main__":
    main()
