"""RADIO's re-ranking (Jia et al., rationale distillation): the math, without models.

A question's top-k retrieved passages are re-ranked by

    score_i = alpha * minmax(rationale_sim)_i + (1 - alpha) * minmax(retrieval_score)_i

where ``rationale_sim`` is the dot product of the bi-encoder embedding of "question answer
rationale" with the passage's embedding, and minmax maps a list to [0, 1]. ``alpha = 1`` is
"without the retrieval score", ``alpha = 0`` the retrieval order itself. The training group is
the top passage after re-ranking (positive) against the passages at ``NEGATIVE_RANKS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gainrag.selector.fusion import minmax

SYSTEM = (
    "You are a professional QA assistant. Given a question and the ground truth answer, you can "
    "output the rationale why the ground truth answer is correct."
)
NEGATIVE_RANKS = (3, 4, 6, 9, 13, 18)  # RADIO's "top-k shifted by N": a group of 7


def rationale_prompt(question: str, answer: str) -> str:
    """RADIO's prompt as one user message (the Generator interface takes one): the system text,
    then the ``Question:``, ``Answer:`` and ``Rationale:`` turns, each on its own line."""
    return f"{SYSTEM}\n\nQuestion: {question}\nAnswer: {answer}\nRationale: "


def rationale_query(question: str, answer: str, rationale: str) -> str:
    """The text the bi-encoder embeds for the rationale similarity."""
    return f"{question} {answer} {rationale}"


def mix(rationale: Sequence[float], retrieval: Sequence[float], alpha: float) -> list[float]:
    """alpha * minmax(rationale) + (1 - alpha) * minmax(retrieval)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(rationale) != len(retrieval):
        raise ValueError("one rationale score and one retrieval score per passage")
    return [
        alpha * a + (1.0 - alpha) * b
        for a, b in zip(minmax(rationale), minmax(retrieval), strict=True)
    ]


def rerank(mixed: Sequence[float]) -> list[int]:
    """Indices best first; ties keep the retrieval order (a stable sort)."""
    return sorted(range(len(mixed)), key=lambda i: -mixed[i])


def group_indices(
    order: Sequence[int], ranks: Sequence[int] = NEGATIVE_RANKS
) -> tuple[int, list[int]] | None:
    """(positive, negatives) for a re-ranked list: rank 0, and the ranks in ``ranks`` that exist.

    A list shorter than ``max(ranks) + 1`` gives fewer negatives (never a repeated or shifted one);
    None when not one negative rank exists.
    """
    negs = [order[r] for r in ranks if r < len(order)]
    return (order[0], negs) if negs else None


def radio_group(
    row: dict[str, Any], alpha: float, ranks: Sequence[int] = NEGATIVE_RANKS
) -> dict[str, Any] | None:
    """A training group from one rationales row (candidates with ``retrieval_score`` and
    ``rationale_score``), in the reranker format ``{"query", "pos", "neg"}``."""
    cands = row["candidates"]
    if len(cands) < 2:
        return None
    mixed = mix([c["rationale_score"] for c in cands], [c["retrieval_score"] for c in cands], alpha)
    picked = group_indices(rerank(mixed), ranks)
    if picked is None:
        return None
    pos, negs = picked
    text = [f"{c['title']}\n{c['text']}" for c in cands]
    return {"query": row["question"], "pos": [text[pos]], "neg": [text[i] for i in negs]}
