"""Score fusion of the selector and the retriever (``selector/fusion.py``), hand-computed."""

from __future__ import annotations

import pytest

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
