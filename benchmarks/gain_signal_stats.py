"""What gain signals say, and how far two label sources agree.

For each source (a ``gain-shards`` directory or a ``gain-signals`` JSONL file): how often the
lowest-PPL candidate contains a gold answer, against the retriever's top-1; how often it is the
retriever's top-1 or the pseudo-passage. For each pair of sources, on the questions both
labelled and the candidates both scored (by id): Spearman's rho between the two PPL orders per
question (mean and median), and how often both pick the same best candidate.

    python -m benchmarks.gain_signal_stats data/train/signals/qwen0.5b-k20 \\
        data/train/gain_signals_k10.jsonl --name gain_signal_stats
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from itertools import combinations
from pathlib import Path
from typing import Any

from benchmarks.bench_gain_scorer import spearman
from benchmarks.common import rel, table, write_result
from gainrag.training.signals.gain_shards import MANIFEST, load_manifest, shard_path
from gainrag.types import PSEUDO_ID


def load(path: Path) -> dict[str, dict[str, Any]]:
    """Rows by question id: ``{"candidates": {id: {"ppl", "has_answer", "rank"}}, ...}``."""
    rows: list[dict[str, Any]] = []
    if path.is_dir():
        manifest = load_manifest(path)
        if manifest is None:
            raise SystemExit(f"{path} has no {MANIFEST}")
        for s in range(len(manifest["shards"])):
            f = shard_path(path, s)
            if f.is_file():
                rows += [json.loads(x) for x in f.read_text().splitlines() if x]
    else:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        cands = {}
        text = None
        for c in row["candidates"]:
            if not math.isfinite(c["ppl"]):
                continue
            rank = c.get("rank", c.get("retrieval_rank"))
            pseudo = bool(c.get("pseudo")) or c["id"] == PSEUDO_ID
            cid = PSEUDO_ID if pseudo else c["id"]
            cands[cid] = {"ppl": c["ppl"], "has_answer": c["has_answer"], "rank": rank}
            if pseudo:
                text = c.get("text", row.get("pseudo_passage"))
        out[str(row["id"])] = {"candidates": cands, "scorer": row.get("scorer"), "pseudo": text}
    return out


def best(cands: dict[str, dict[str, Any]]) -> str:
    """The id of the lowest-PPL candidate."""
    return min(cands, key=lambda c: cands[c]["ppl"])


def describe(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The share of questions for each property of the lowest-PPL candidate."""
    n = len(rows)
    top1 = [
        next((c for c, v in r["candidates"].items() if v["rank"] == 0), None) for r in rows.values()
    ]
    bests = [best(r["candidates"]) for r in rows.values()]
    cands = [r["candidates"] for r in rows.values()]
    return {
        "questions": n,
        "scorers": sorted({str(r["scorer"]) for r in rows.values()}),
        "best_has_answer": sum(c[b]["has_answer"] for c, b in zip(cands, bests, strict=True)) / n,
        "top1_has_answer": sum(
            bool(t and c[t]["has_answer"]) for c, t in zip(cands, top1, strict=True)
        )
        / n,
        "best_is_top1": sum(b == t for b, t in zip(bests, top1, strict=True)) / n,
        "best_is_pseudo": sum(b == PSEUDO_ID for b in bests) / n,
        "pseudo_kept": sum(PSEUDO_ID in c for c in cands) / n,
        "any_has_answer": sum(any(v["has_answer"] for v in c.values()) for c in cands) / n,
    }


def agreement(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Agreement on the shared questions, over the candidates both scored."""
    rhos: list[float] = []
    same = 0
    shared_q = sorted(set(a) & set(b))
    n = 0
    for q in shared_q:
        ca, cb = a[q]["candidates"], b[q]["candidates"]
        ids = sorted(set(ca) & set(cb))
        if a[q]["pseudo"] != b[q]["pseudo"]:  # two writers' pseudo-passages are two candidates
            ids = [i for i in ids if i != PSEUDO_ID]
        if len(ids) < 3:
            continue
        n += 1
        pa, pb = [ca[i]["ppl"] for i in ids], [cb[i]["ppl"] for i in ids]
        rhos.append(spearman(pa, pb))
        same += min(ids, key=lambda i: ca[i]["ppl"]) == min(ids, key=lambda i: cb[i]["ppl"])
    if not n:
        return {"questions": 0}
    return {
        "questions": n,
        "spearman_mean": statistics.fmean(rhos),
        "spearman_median": statistics.median(rhos),
        "same_best": same / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--name", default="gain_signal_stats")
    args = p.parse_args()
    data = {rel(s): load(s) for s in args.sources}
    stats = {k: describe(v) for k, v in data.items() if v}
    pairs = {f"{x} vs {y}": agreement(data[x], data[y]) for x, y in combinations(data, 2)}
    md = [
        *table(
            ["source", "questions", "best has answer", "top-1 has answer", "best is top-1",
             "best is pseudo", "pseudo kept", "any candidate has answer"],
            [
                (k, s["questions"], f"{s['best_has_answer']:.1%}", f"{s['top1_has_answer']:.1%}",
                 f"{s['best_is_top1']:.1%}", f"{s['best_is_pseudo']:.1%}",
                 f"{s['pseudo_kept']:.1%}", f"{s['any_has_answer']:.1%}")
                for k, s in stats.items()
            ],
        ),
    ]  # fmt: skip
    if pairs:
        md += [
            "",
            *table(
                ["pair (shared questions, shared candidates)", "questions", "Spearman mean",
                 "Spearman median", "same best"],
                [
                    (k, v["questions"], f"{v.get('spearman_mean', float('nan')):.3f}",
                     f"{v.get('spearman_median', float('nan')):.3f}",
                     f"{v.get('same_best', float('nan')):.1%}")
                    for k, v in pairs.items()
                ],
            ),
        ]  # fmt: skip
    write_result(
        args.name,
        {"sources": stats, "agreement": pairs},
        notes=["has_answer is DPR's match of a gold answer in the candidate's text"],
        markdown="\n".join(md),
    )


if __name__ == "__main__":
    main()
