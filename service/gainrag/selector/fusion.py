"""Mixing the selector's scores with the retriever's: per-question min-max, then a weighted sum.

Scores of different models live on different scales (a cross-encoder's logits, a bi-encoder's
cosines), so each is min-max normalised over the question's candidates before the mix, as RADIO
mixes its rationale and retrieval scores. The pipeline uses it when
``pipeline.retrieval_weight`` > 0: on NQ-like data the bundled bi-encoder's top-1 already holds
the answer for most questions (docs/evaluation.md), and a selector that moves away from it loses
more than it wins; the weight keeps part of the retriever's judgement in the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence


def minmax(values: Sequence[float]) -> list[float]:
    """(v - min) / (max - min); all zeros when every value is the same (nothing to rank by)."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def fuse(
    selector: Sequence[float | None], retrieval: Sequence[float | None], weight: float
) -> list[float]:
    """(1 - weight) * minmax(selector) + weight * minmax(retrieval), one value per candidate.

    Each part is normalised over the candidates that have that score; a candidate without one
    gets that part's lowest value, 0. Without a retrieval score (the pseudo-passage): at weight 1
    the order is the retrieval order with the pseudo-passage last, as when the selector is down.
    Without a selector score (a retrieved passage below ``pipeline.select_top``, never scored):
    its retrieval part is below every scored passage's, so it ranks after all of them.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if len(selector) != len(retrieval):
        raise ValueError("one selector score and one retrieval score (or None) per candidate")
    return [
        (1.0 - weight) * s + weight * r
        for s, r in zip(_minmax_known(selector), _minmax_known(retrieval), strict=True)
    ]


def _minmax_known(values: Sequence[float | None]) -> list[float]:
    """:func:`minmax` over the values that are not None; None becomes 0."""
    normed = iter(minmax([v for v in values if v is not None]))
    return [0.0 if v is None else next(normed) for v in values]
