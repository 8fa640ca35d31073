"""Score fusion, hand-computed: the selector with the retriever (``selector/fusion.py``) and dense
with lexical retrieval (``retrieval/fusion.py``)."""

from __future__ import annotations

import pytest

from gainrag.retrieval.fusion import minmax_mix, rrf
from gainrag.selector.fusion import fuse, minmax


def test_minmax_maps_to_the_unit_interval_and_flat_lists_to_zeros() -> None:
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax([-1.0, -1.0]) == [0.0, 0.0]
    assert minmax([]) == []


def test_fuse_weights_the_two_normalised_scores() -> None:
    # selector [0, 10, 5] -> [0, 1, 0.5]; retrieval [0.9, 0.5, 0.7] -> [1, 0, 0.5]
    assert fuse([0.0, 10.0, 5.0], [0.9, 0.5, 0.7], 0.25) == pytest.approx([0.25, 0.75, 0.5])
    assert fuse([0.0, 10.0, 5.0], [0.9, 0.5, 0.7], 0.0) == [0.0, 1.0, 0.5]
    assert fuse([0.0, 10.0, 5.0], [0.9, 0.5, 0.7], 1.0) == pytest.approx([1.0, 0.0, 0.5])


def test_a_candidate_without_retrieval_score_gets_the_lowest_retrieval_part() -> None:
    # the retrieval scores are normalised over the two retrieved passages only: [1, 0], then 0
    assert fuse([1.0, 3.0, 5.0], [0.8, 0.6, None], 0.5) == pytest.approx([0.5, 0.25, 0.5])


def test_the_pseudo_passage_alone_retrieval_down_still_gets_a_score() -> None:
    # the retrieval-down fallback ranks the pseudo-passage alone: nothing to normalise, no error
    assert fuse([3.0], [None], 0.5) == [0.0]
    assert fuse([], [], 0.5) == []


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_fuse_rejects_weights_outside_zero_one(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        fuse([1.0], [1.0], weight)


def test_fuse_needs_one_retrieval_entry_per_candidate() -> None:
    with pytest.raises(ValueError, match="per candidate"):
        fuse([1.0, 2.0], [1.0], 0.5)


def test_a_candidate_without_selector_score_gets_the_lowest_selector_part() -> None:
    # pipeline.select_top=2: selector [3, 1] -> [1, 0] over the two scored passages, the others 0;
    # retrieval normalised over all four: [1, 2/3, 1/3, 0]
    fused = fuse([3.0, 1.0, None, None], [0.9, 0.8, 0.7, 0.6], 0.5)
    assert fused == pytest.approx([1.0, 1 / 3, 1 / 6, 0.0])
    # an unscored passage's retrieval part is below every scored passage's, so it ranks after
    assert max(fused[2:]) < min(fused[:2])


# --------------------------------------------------------------- retrieval: dense + lexical


def approx(pairs: list[tuple[object, float]]) -> list[tuple[object, object]]:
    return [(key, pytest.approx(score, abs=1e-12)) for key, score in pairs]


def test_rrf_sums_reciprocal_ranks_and_breaks_ties_by_best_rank_then_id() -> None:
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    lexical = [("c", 5.0), ("d", 4.0), ("a", 3.0)]
    # a: 1/61 + 1/63, c: 1/63 + 1/61 (equal, both best rank 0: by id); b, d: 1/62 (rank 1: by id)
    fused = rrf([dense, lexical], 10)
    assert fused == approx(
        [("a", 1 / 61 + 1 / 63), ("c", 1 / 61 + 1 / 63), ("b", 1 / 62), ("d", 1 / 62)]
    )
    assert rrf([dense, lexical], 2) == fused[:2]
    assert rrf([dense, lexical], 0) == []


def test_rrf_a_better_rank_beats_a_smaller_id_on_equal_scores() -> None:
    # c = 0: z at rank 1 once = 1/1; a at rank 2 twice = 1/2 + 1/2; all of x, y, z, a score 1
    lists = [[("z", 1.0), ("m", 0.5)], [("y", 1.0), ("a", 0.5)], [("x", 1.0), ("a", 0.2)]]
    assert rrf(lists, 10, c=0) == [("x", 1.0), ("y", 1.0), ("z", 1.0), ("a", 1.0), ("m", 0.5)]


def test_rrf_uses_positions_only_and_the_first_of_a_repeated_id() -> None:
    assert rrf([[(3, -1.0), (1, 100.0), (3, 7.0)]], 5, c=10) == approx([(3, 1 / 11), (1, 1 / 12)])


def test_rrf_of_nothing_and_of_one_list() -> None:
    assert rrf([], 5) == []
    assert rrf([[], []], 5) == []
    assert rrf([[], [(7, 0.1), (2, 0.2)]], 5) == approx([(7, 1 / 61), (2, 1 / 62)])
    with pytest.raises(ValueError, match="c must"):
        rrf([[(1, 1.0)]], 5, c=-1)


def test_minmax_mix_weights_each_lists_own_normalisation() -> None:
    dense = [(1, 0.83), (2, 0.61), (3, 0.52)]  # -> 1, 9/31, 0
    lexical = [(3, 12.0), (4, 8.0), (1, 4.0)]  # -> 1, 1/2, 0; 2 is missing: 0
    assert minmax_mix(dense, lexical, 10, weight=0.3) == approx(
        [(1, 0.7), (3, 0.3), (2, 0.7 * 9 / 31), (4, 0.15)]
    )
    assert minmax_mix(dense, lexical, 10, weight=0.7) == approx(
        [(3, 0.7), (4, 0.35), (1, 0.3), (2, 0.3 * 9 / 31)]
    )
    assert minmax_mix(dense, lexical, 2, weight=0.7) == approx([(3, 0.7), (4, 0.35)])
    assert minmax_mix(dense, lexical, 0, weight=0.7) == []


def test_minmax_mix_ties_go_to_the_best_rank_then_the_smaller_id() -> None:
    dense = [(1, 1.0), (2, 0.75), (3, 0.5)]  # -> 1, 1/2, 0 (exact in binary: exact ties)
    lexical = [(3, 12.0), (4, 8.0), (1, 4.0)]  # -> 1, 1/2, 0
    # 1 and 3 both 0.5 at best rank 0; 2 and 4 both 0.25 at best rank 1
    assert minmax_mix(dense, lexical, 10, weight=0.5) == [(1, 0.5), (3, 0.5), (2, 0.25), (4, 0.25)]
    # weight 0: the dense order; the zeros (dense's last hit 3, lexical-only 4) by best rank:
    # 3 is lexical's rank 0, 4 its rank 1
    assert minmax_mix(dense, lexical, 10, weight=0.0) == [(1, 1.0), (2, 0.5), (3, 0.0), (4, 0.0)]


def test_minmax_mix_a_constant_list_scores_one_for_every_hit() -> None:
    # one lexical hit, and a dense list of equal scores: each hit is its list's best
    assert minmax_mix([(1, 0.4), (2, 0.4)], [(2, 3.0)], 10, weight=0.25) == [(2, 1.0), (1, 0.75)]


def test_minmax_mix_of_empty_lists() -> None:
    assert minmax_mix([], [], 5, weight=0.5) == []
    assert minmax_mix([], [("b", 2.0), ("a", 1.0)], 5, weight=0.4) == approx(
        [("b", 0.4), ("a", 0.0)]
    )
    assert minmax_mix([("a", 0.3), ("b", 0.1)], [], 5, weight=0.4) == approx(
        [("a", 0.6), ("b", 0.0)]
    )


@pytest.mark.parametrize("weight", [-0.01, 1.01])
def test_minmax_mix_rejects_weights_outside_zero_one(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        minmax_mix([(1, 1.0)], [(1, 1.0)], 5, weight=weight)
