"""Print the README's quality tables from <dir>/eval_<set>_<preset>.json (and its records in
eval_<set>_<preset>.questions.jsonl.gz, or inline in an older report).

Under each table, the trained selectors are compared with the baselines question by question, on
acc (GainRAG's cover-EM) and on EM: how many questions each preset gets right where the baseline
does not (and the reverse), with the exact sign test's two-sided p. ``--versus DIR`` adds, per
preset found in both directories, the same comparison of this run against the other one over
the questions both answered (e.g. top_n 5 on a slice against the full top_n 1 run).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gainrag.evaluation.harness import PRESETS, format_table
from gainrag.evaluation.qa_metrics import paired_em, record_acc
from gainrag.evaluation.report import load_report

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


def versus_table(
    reports: dict[str, dict[str, Any]], others: dict[str, dict[str, Any]], label: str
) -> str:
    """Each preset of ``reports`` against the same preset in ``others`` (another run), on the
    questions both hold, acc and EM ("" if no preset is in both)."""
    rows = []
    for preset, report in reports.items():
        if preset not in others:
            continue
        for metric in METRICS:
            mine = scores_by_id(report, metric)
            theirs = scores_by_id(others[preset], metric)
            common = mine.keys() & theirs.keys()
            wins, losses, p = paired_em(
                {i: mine[i] for i in common}, {i: theirs[i] for i in common}
            )
            mean_a = 100 * sum(mine[i] for i in common) / max(1, len(common))
            mean_b = 100 * sum(theirs[i] for i in common) / max(1, len(common))
            rows.append(
                f"| `{preset}` | {metric} | {len(common)} | {mean_a:.1f} | {mean_b:.1f} "
                f"| {wins} | {losses} | {p:.3f} |"
            )
    if not rows:
        return ""
    head = [
        f"| preset | metric | questions | this run | {label} | only this run | only {label} "
        "| sign test p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def load_reports(directory: Path, name: str) -> dict[str, dict[str, Any]]:
    """Preset -> report of ``directory/eval_<name>_<preset>.json``, presets in table order."""
    reports = {}
    for preset in ORDER:
        path = directory / f"eval_{name}_{preset}.json"
        if path.exists():
            reports[preset] = load_report(path)
    return reports


def main() -> None:
    """One markdown table per dev set, presets in a fixed order, then the paired comparisons."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", default=["nq_dev", "squad_dev"])
    p.add_argument("--dir", type=Path, default=RESULTS, help="where the eval JSON files are")
    p.add_argument(
        "--versus", type=Path, help="another run's directory to compare each preset with"
    )
    args = p.parse_args()
    assert set(ORDER) == set(PRESETS)
    for name in args.sets:
        reports = load_reports(args.dir, name)
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
            if args.versus is not None:
                versus = versus_table(reports, load_reports(args.versus, name), str(args.versus))
                if versus:
                    print(versus)
                    print()


if __name__ == "__main__":
    main()
