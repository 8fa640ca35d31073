"""What hybrid retrieval adds to a search: ``PassageIndex.search`` dense vs hybrid, side by side.

On ``var/index`` (the shipped corpus) in this process: the dev questions' vectors are encoded
once beforehand (encoding is the same work in both modes), then each mode searches them at k =
``--k`` in batches of 1 and of 64, alternating mode by mode over ``--reps`` rounds; the figure is
the median per question. Hybrid = FAISS's top ``depth`` + BM25's top ``depth`` + the min-max
fusion (the served settings), dense = FAISS alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import ROOT, question_texts, table, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=ROOT / "data/questions/squad_dev.jsonl")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from gainrag.config import Settings
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.index import PassageIndex
    from gainrag.retrieval.local import fusion_of

    r = Settings().retrieval
    fusion = fusion_of(r.model_copy(update={"mode": "hybrid"}))
    index = PassageIndex.load(r.index_dir, use_gpu=False, lexical=True)
    questions = question_texts(args.questions, args.limit)
    vectors = BiEncoder.from_settings(r).encode(questions)
    modes = {"dense": None, "hybrid": fusion}
    per_q: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.reps):
        for batch in (1, 64):
            for mode, f in modes.items():  # alternating: drift hits both alike
                t = time.perf_counter()
                for i in range(0, len(questions), batch):
                    index.search(
                        vectors[i : i + batch], args.k, texts=questions[i : i + batch], fusion=f
                    )
                ms = (time.perf_counter() - t) * 1000 / len(questions)
                per_q.setdefault((mode, batch), []).append(ms)
    index.close()
    med = {key: statistics.median(v) for key, v in per_q.items()}
    rows = [
        [batch, f"{med[('dense', batch)]:.3f}", f"{med[('hybrid', batch)]:.3f}",
         f"{med[('hybrid', batch)] / med[('dense', batch)]:.2f}x"]
        for batch in (1, 64)
    ]  # fmt: skip
    results = {
        "questions": len(questions),
        "k": args.k,
        "fusion": {"method": fusion.method, "weight": fusion.weight, "depth": fusion.depth}
        if fusion
        else None,
        "ms_per_question_median": {f"{m}_batch{b}": v for (m, b), v in med.items()},
        "reps": args.reps,
    }
    md = "\n".join(
        [
            "# Hybrid vs dense search (PassageIndex.search, query vectors given)",
            "",
            f"{len(questions)} questions of `{args.questions.name}`, k = {args.k}, "
            f"{len(index)} passages; median of {args.reps} alternating rounds.",
            "",
            *table(
                ["batch", "dense ms / question", "hybrid ms / question", "hybrid / dense"], rows
            ),
        ]
    )
    write_result("hybrid_search", results, markdown=md)


if __name__ == "__main__":
    main()
