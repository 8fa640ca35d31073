"""Relevance warm-start groups: the gold passage against hard negatives from the retriever.

A hard negative is a retrieved passage that is neither gold nor contains a gold answer (DPR's
has_answer), so that a passage which does answer the question is never pushed down.
"""

from __future__ import annotations

import random
from typing import Any

from gainrag.evaluation.qa_metrics import has_answer
from gainrag.retrieval.local import LocalRetriever


def relevance_groups(
    retriever: LocalRetriever,
    questions: list[dict[str, Any]],
    *,
    group_size: int = 16,
    k: int = 50,
    seed: int = 0,
    batch: int = 64,
) -> list[dict[str, Any]]:
    """One group per question that has a gold passage in the index and enough negatives."""
    rng = random.Random(seed)
    index = retriever.index
    groups = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        results = retriever.search_many([q["question"] for q in chunk], k)
        for q, hits in zip(chunk, results, strict=True):
            gold_ids = [g for g in q.get("gold_ids") or [] if index.position(g) is not None]
            if not gold_ids:
                continue
            gold = index.get(gold_ids[0])
            assert gold is not None
            negs = [
                h.passage
                for h in hits
                if h.passage.id not in gold_ids and not has_answer(h.passage.text, q["answers"])
            ]
            if len(negs) < group_size - 1:
                continue
            chosen = rng.sample(negs, group_size - 1)
            groups.append(
                {
                    "query": q["question"],
                    "pos": [gold.as_candidate_text()],
                    "neg": [p.as_candidate_text() for p in chosen],
                }
            )
    return groups
