"""The ranking of one question's candidates, as a pure function of plain numbers.

The pipeline gathers the inputs (the retrieved passages, the pseudo-passage, the selector's
scores or the reason it has none) and calls :func:`rank`; everything that decides the order lives
here, with no I/O, clock, logging or metrics, so tests can call it with hand-written numbers:

- the candidates: the retrieved passages in retrieval order, then the pseudo-passage;
- the fusion of the selector's scores with the retriever's (:func:`gainrag.selector.fusion.fuse`,
  ``pipeline.retrieval_weight``), passages the selector did not score (below
  ``pipeline.select_top``) after the scored ones;
- the degradation when the selector failed: retrieval order, the pseudo-passage last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gainrag.selector.fusion import fuse
from gainrag.types import Degradation, Passage, Retrieved, Scored

# Below any cosine of a retrieved passage: with the selector down, the pseudo-passage ranks last.
PSEUDO_SCORE_WITHOUT_SELECTOR = -1.0


@dataclass(frozen=True)
class Ranking:
    """The candidates best first, and what the ranking had to do without (empty when nothing)."""

    candidates: list[Scored]
    degraded: list[Degradation]


def rank(
    retrieved: Sequence[Retrieved],
    pseudo: Passage | None,
    scores: Sequence[float | None] | None,
    *,
    weight: float,
    selector_failure: str | None = None,
) -> Ranking:
    """Rank the retrieved passages and the pseudo-passage (None when there is none).

    ``scores`` holds one selector score per candidate (retrieved passages in retrieval order,
    then the pseudo-passage), None for a passage the selector did not score; ``scores=None``
    means no selection (retrieval order). ``selector_failure`` (the selector's error message)
    means it was asked and failed: retrieval order, listed as a ``selector_down`` degradation.

    ``score`` of each candidate becomes the value it is ranked by: the fused score, or with
    ``weight == 0`` the selector's own (an unscored passage gets the lowest scored value).
    The sort is stable: scored first, then by score; ties keep retrieval order, the
    pseudo-passage last.
    """
    candidates = [
        Scored(r.passage, r.score, retrieval_rank=r.rank, retrieval_score=r.score)
        for r in retrieved
    ]
    if pseudo is not None:  # its score comes from the selector
        candidates.append(Scored(pseudo, 0.0))
    if selector_failure is not None:
        if pseudo is not None:
            candidates[-1].score = PSEUDO_SCORE_WITHOUT_SELECTOR
        message = (
            f"{selector_failure}; candidates kept in retrieval order (scores are retrieval "
            "scores; the pseudo-passage ranks last)"
        )
        return Ranking(candidates, [Degradation("selector_down", message)])
    if scores is None:
        return Ranking(candidates, [])
    if len(scores) != len(candidates):
        raise ValueError(f"{len(scores)} selector scores for {len(candidates)} candidates")
    # Keep part of the retriever's judgement (selector.fusion says why); at weight 0 the same
    # call ranks by the selector alone, unscored passages after the scored ones.
    ranking = fuse(scores, [s.retrieval_score for s in candidates], weight)
    if weight == 0.0:  # the selector's own scores (unscored: its lowest)
        lowest = min((x for x in scores if x is not None), default=0.0)
        ranking = [lowest if x is None else x for x in scores]
    for s, x, r in zip(candidates, scores, ranking, strict=True):
        s.selector_score, s.score = (None if x is None else float(x)), float(r)
    ranked = sorted(candidates, key=lambda s: (s.selector_score is None, -s.score))
    return Ranking(ranked, [])
