"""The pure ranking function (gainrag.selector.ranking.rank) with hand-computed numbers."""

from __future__ import annotations

import pytest

from gainrag.selector.ranking import PSEUDO_SCORE_WITHOUT_SELECTOR, rank
from gainrag.types import PSEUDO_ID, Degradation, Passage, Retrieved

A, B, C = (Passage(i, f"title {i}", f"text {i}") for i in "abc")
PSEUDO = Passage(PSEUDO_ID, "", "written by the LLM", pseudo=True)
# Retrieval scores 0.9, 0.8, 0.5: min-max normalised 1, 0.75, 0.
RETRIEVED = [Retrieved(A, 0, 0.9), Retrieved(B, 1, 0.8), Retrieved(C, 2, 0.5)]


def ids(ranking: object) -> list[str]:
    return [s.passage.id for s in ranking.candidates]  # type: ignore[attr-defined]


def test_without_selection_the_retrieval_order_stays_and_the_pseudo_passage_is_last() -> None:
    r = rank(RETRIEVED, PSEUDO, None, weight=0.5)
    assert ids(r) == ["a", "b", "c", PSEUDO_ID]
    assert [s.score for s in r.candidates] == [0.9, 0.8, 0.5, 0.0]
    assert [s.retrieval_rank for s in r.candidates] == [0, 1, 2, None]
    assert all(s.selector_score is None for s in r.candidates)
    assert r.degraded == []


def test_the_mix_at_weight_one_half() -> None:
    # selector 1, 3, 2 and the pseudo-passage 0 -> min-max 1/3, 1, 2/3, 0;
    # retrieval 1, 0.75, 0 and the pseudo-passage (no retrieval score) 0.
    r = rank(RETRIEVED, PSEUDO, [1.0, 3.0, 2.0, 0.0], weight=0.5)
    assert ids(r) == ["b", "a", "c", PSEUDO_ID]
    by_id = {s.passage.id: s for s in r.candidates}
    assert by_id["b"].score == pytest.approx(0.5 * 1 + 0.5 * 0.75)
    assert by_id["a"].score == pytest.approx(0.5 / 3 + 0.5 * 1)
    assert by_id["c"].score == pytest.approx(0.5 * 2 / 3 + 0.0)
    assert by_id[PSEUDO_ID].score == 0.0
    assert [by_id[i].selector_score for i in ("a", "b", "c", PSEUDO_ID)] == [1.0, 3.0, 2.0, 0.0]
    # the retrieval part is kept on every candidate
    assert [by_id[i].retrieval_score for i in "abc"] == [0.9, 0.8, 0.5]


def test_the_pseudo_passage_wins_when_the_selector_prefers_it_enough() -> None:
    r = rank(RETRIEVED, PSEUDO, [0.0, 0.0, 0.0, 5.0], weight=0.4)
    # selector 0, 0, 0, 1 -> fused a: 0.4, pseudo: 0.6
    assert ids(r)[0] == PSEUDO_ID
    assert r.candidates[0].score == pytest.approx(0.6)
    assert r.candidates[1].score == pytest.approx(0.4)


def test_unscored_passages_rank_after_every_scored_one() -> None:
    # select_top = 2: c was not scored. Selector 2, 1 -> 1, 0; retrieval 1, 0.75, 0.
    r = rank(RETRIEVED, None, [2.0, 1.0, None], weight=0.5)
    assert ids(r) == ["a", "b", "c"]
    assert [s.score for s in r.candidates] == pytest.approx([1.0, 0.375, 0.0])
    assert r.candidates[2].selector_score is None
    # even when its fused value would beat a scored passage's
    r = rank(RETRIEVED[::-1], None, [2.0, 1.0, None], weight=0.9)
    assert ids(r)[-1] == "a" and r.candidates[-1].selector_score is None


def test_weight_zero_ranks_by_the_selector_alone() -> None:
    r = rank(RETRIEVED, PSEUDO, [1.0, 2.5, None, 2.0], weight=0.0)
    assert ids(r) == ["b", PSEUDO_ID, "a", "c"]
    # the selector's own values; the unscored passage gets the lowest scored value
    assert [s.score for s in r.candidates] == [2.5, 2.0, 1.0, 1.0]


def test_ties_keep_the_retrieval_order_and_the_pseudo_passage_last() -> None:
    r = rank(RETRIEVED, PSEUDO, [1.0, 1.0, 1.0, 1.0], weight=0.0)
    assert ids(r) == ["a", "b", "c", PSEUDO_ID]


def test_a_failed_selector_keeps_the_retrieval_order_and_says_so() -> None:
    r = rank(RETRIEVED, PSEUDO, None, weight=0.5, selector_failure="the selector is down")
    assert ids(r) == ["a", "b", "c", PSEUDO_ID]
    assert [s.score for s in r.candidates] == [0.9, 0.8, 0.5, PSEUDO_SCORE_WITHOUT_SELECTOR]
    assert r.degraded == [
        Degradation(
            "selector_down",
            "the selector is down; candidates kept in retrieval order (scores are retrieval "
            "scores; the pseudo-passage ranks last)",
        )
    ]
    alone = rank(RETRIEVED, None, None, weight=0.5, selector_failure="x")
    assert alone.candidates[-1].score == 0.5  # no pseudo-passage: nothing is pushed down


def test_nothing_to_rank() -> None:
    r = rank([], None, None, weight=0.5)
    assert r.candidates == [] and r.degraded == []
    assert ids(rank([], PSEUDO, [3.0], weight=0.5)) == [PSEUDO_ID]


def test_one_score_per_candidate_or_an_error() -> None:
    with pytest.raises(ValueError, match="2 selector scores for 4 candidates"):
        rank(RETRIEVED, PSEUDO, [1.0, 2.0], weight=0.5)


def test_pure_same_inputs_same_ranking_inputs_untouched() -> None:
    before = [(r.passage, r.rank, r.score) for r in RETRIEVED]
    first = rank(RETRIEVED, PSEUDO, [1.0, 3.0, 2.0, 0.0], weight=0.5)
    second = rank(RETRIEVED, PSEUDO, [1.0, 3.0, 2.0, 0.0], weight=0.5)
    assert first == second
    assert [(r.passage, r.rank, r.score) for r in RETRIEVED] == before
