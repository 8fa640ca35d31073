"""Should the pseudo-passage get a retrieval-like score under the mix? A measurement.

With ``pipeline.retrieval_weight`` > 0 the ranking mixes the selector's score with the
retriever's (``selector/fusion.py``). The pseudo-passage was never retrieved, so it gets the
lowest retrieval part (0). The alternative is to score it as the retriever scores a passage: the
bi-encoder's cosine between the question and the pseudo-passage's candidate text.

This script takes a gain-signal file (``data/train/gain_signals_*.jsonl``: questions, the
retrieved candidates with their retrieval scores and the pseudo-passage, each with the reader's
contrastive PPL) and reports, over the questions that have a pseudo-passage, where that cosine
would rank the pseudo-passage among the retrieved passages, against how often the pseudo-passage
is the candidate the gain teacher likes best (lowest PPL). No LLM runs: only the bi-encoder, in
fp32 as for the index.

    python -m benchmarks.pseudo_retrieval_score [--signals data/train/gain_signals_k10.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, rel, table, write_result
from gainrag.config import Settings
from gainrag.retrieval.encoder import BiEncoder
from gainrag.types import Passage


def analyse(rows: list[dict[str, Any]], cosines: np.ndarray) -> dict[str, Any]:
    """Rank of each pseudo-passage's cosine among its question's retrieval scores (0 = above the
    retriever's top-1), and how often the pseudo-passage has the lowest PPL."""
    ranks: list[int] = []
    lowest = 0
    top1: list[float] = []
    for row, cos in zip(rows, cosines, strict=True):
        retrieved = [c["retrieval_score"] for c in row["candidates"] if not c["pseudo"]]
        ranks.append(sum(score > float(cos) for score in retrieved))
        top1.append(max(retrieved))
        lowest += min(row["candidates"], key=lambda c: c["ppl"])["pseudo"]
    n = len(rows)
    return {
        "questions_with_pseudo": n,
        "pseudo_cosine_mean": round(float(np.mean(cosines)), 4),
        "retrieved_top1_score_mean": round(statistics.mean(top1), 4),
        "pseudo_above_retrieved_top1": round(sum(r == 0 for r in ranks) / n, 4),
        "pseudo_in_retrieved_top3": round(sum(r < 3 for r in ranks) / n, 4),
        "pseudo_rank_median": float(statistics.median(ranks)),
        "pseudo_lowest_ppl": round(lowest / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--signals", type=Path, default=ROOT / "data" / "train" / "gain_signals_k10.jsonl"
    )
    args = parser.parse_args()
    with args.signals.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if any(c["pseudo"] for c in r["candidates"])]
    encoder = BiEncoder.from_settings(Settings().retrieval, dtype="float32")
    questions = encoder.encode([r["question"] for r in rows])
    # the candidate text the index embeds for a passage (build_index), here for the pseudo-passage
    pseudo = encoder.encode(
        [
            next(
                Passage(id=c["id"], title=c["title"], text=c["text"], pseudo=True)
                for c in r["candidates"]
                if c["pseudo"]
            ).as_candidate_text()
            for r in rows
        ]
    )
    cosines = (questions * pseudo).sum(axis=1)
    found = analyse(rows, cosines)
    generators = sorted({str(r.get("generator", "?")) for r in rows})
    results = {"signals": rel(args.signals), "pseudo_writer": generators}
    results |= {"encoder": encoder.version, **found}
    markdown = "\n".join(
        table(
            ["signals", "questions", "pseudo above retriever's top-1", "in top-3", "lowest PPL"],
            [
                [
                    rel(args.signals),
                    found["questions_with_pseudo"],
                    f"{100 * found['pseudo_above_retrieved_top1']:.1f}%",
                    f"{100 * found['pseudo_in_retrieved_top3']:.1f}%",
                    f"{100 * found['pseudo_lowest_ppl']:.1f}%",
                ]
            ],
        )
    )
    write_result("pseudo_retrieval_score", results, markdown=markdown)


if __name__ == "__main__":
    main()
