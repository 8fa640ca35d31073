"""Fusing ranked lists of one query (dense and lexical retrieval) into one ranking.

Each input list is ``(id, score)`` best first; an id repeated within a list counts at its first
(best) position. Ties in the fused score are broken by the id's best 0-based rank in any input
list, then by the id itself (smaller first), so the result is a function of the inputs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

K = TypeVar("K", int, str)  # store fids or passage ids: hashable and ordered for ties


def _first_ranks(ranked: Sequence[tuple[K, float]]) -> dict[K, int]:
    ranks: dict[K, int] = {}
    for rank, (key, _) in enumerate(ranked):
        ranks.setdefault(key, rank)
    return ranks


def _top(scores: dict[K, float], best_rank: dict[K, int], k: int) -> list[tuple[K, float]]:
    order = sorted(scores, key=lambda key: (-scores[key], best_rank[key], key))
    return [(key, scores[key]) for key in order[: max(k, 0)]]


def rrf(
    lists: Sequence[Sequence[tuple[K, float]]], k: int, *, c: int = 60
) -> list[tuple[K, float]]:
    """Reciprocal rank fusion: score(id) = sum over the lists holding it of 1 / (c + rank), rank
    1-based; the top ``k``. Input scores are ignored, only positions count."""
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    scores: dict[K, float] = {}
    best: dict[K, int] = {}
    for ranked in lists:
        for key, rank in _first_ranks(ranked).items():
            scores[key] = scores.get(key, 0.0) + 1.0 / (c + rank + 1)
            best[key] = min(rank, best.get(key, rank))
    return _top(scores, best, k)


def _minmax(ranked: Sequence[tuple[K, float]]) -> dict[K, float]:
    """(s - min) / (max - min) over the list's hits; 1.0 for all when min == max.

    Unlike the selector mix's flat-list zeros, a constant list maps to 1: every hit is then the
    list's best, and a hit must not score like an id the list did not return (0). A one-hit
    lexical list (one passage holds the rare word) keeps its full weight that way.
    """
    firsts: dict[K, float] = {}
    for key, score in ranked:
        firsts.setdefault(key, score)
    if not firsts:
        return {}
    lo, hi = min(firsts.values()), max(firsts.values())
    if hi == lo:
        return dict.fromkeys(firsts, 1.0)
    return {key: (s - lo) / (hi - lo) for key, s in firsts.items()}


def minmax_mix(
    dense: Sequence[tuple[K, float]],
    lexical: Sequence[tuple[K, float]],
    k: int,
    *,
    weight: float,
) -> list[tuple[K, float]]:
    """(1 - weight) * minmax(dense) + weight * minmax(lexical) per id, the top ``k``.

    Each list is normalised over its own hits; an id missing from a list gets 0 from it.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    d, lex = _minmax(dense), _minmax(lexical)
    d_rank, lex_rank = _first_ranks(dense), _first_ranks(lexical)
    scores: dict[K, float] = {}
    best: dict[K, int] = {}
    for key in d.keys() | lex.keys():
        scores[key] = (1.0 - weight) * d.get(key, 0.0) + weight * lex.get(key, 0.0)
        best[key] = min(d_rank.get(key, len(dense)), lex_rank.get(key, len(lexical)))
    return _top(scores, best, k)
