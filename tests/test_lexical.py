"""The tantivy BM25 index (``retrieval/lexical.py``): BM25 math, upserts, safety, persistence."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gainrag.retrieval.lexical import SIDECAR, LexicalIndex

# (fid, title, text); tokens after en_stem in the comments (title first)
ROWS = [
    (1, "Zebra", "a striped horse"),  # zebra a stripe horse: 4
    (2, "Horse", "a horse runs"),  # horse a horse run: 4
    (-5, "", "nothing here"),  # noth here: 2 (empty title: not indexed)
]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LexicalIndex]:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.replace_all(ROWS, 1)
    yield ix
    ix.close()


def bm25(tf: int, dl: int, n: int, big_n: int, avgdl: float) -> float:
    """tantivy's BM25: k1 1.2, b 0.75, idf ln(1 + (N - n + 0.5) / (n + 0.5))."""
    idf = math.log(1 + (big_n - n + 0.5) / (n + 0.5))
    return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))


def fids(hits: list[tuple[int, float]]) -> list[int]:
    return [f for f, _ in hits]


def test_scores_are_bm25_over_title_and_text(index: LexicalIndex) -> None:
    avgdl = 10 / 3
    (hits,) = index.search(["horses"], 10)  # stemmed to horse: in fid 2 twice (title + text)
    assert fids(hits) == [2, 1]
    assert hits[0][1] == pytest.approx(bm25(2, 4, 2, 3, avgdl), rel=1e-6)  # f32 in tantivy
    assert hits[1][1] == pytest.approx(bm25(1, 4, 2, 3, avgdl), rel=1e-6)


def test_the_rare_term_outranks_the_common_one(index: LexicalIndex) -> None:
    # "zebra" is in one passage (title only), "horse" in two: zebra's idf wins over horse's tf
    (hits,) = index.search(["zebra horse"], 10)
    assert fids(hits) == [1, 2]
    avgdl = 10 / 3
    one = bm25(1, 4, 1, 3, avgdl) + bm25(1, 4, 2, 3, avgdl)
    assert hits[0][1] == pytest.approx(one, rel=1e-6)


def test_k_cuts_and_equal_scores_rank_the_smaller_fid_first(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.replace_all([(9, "", "same words"), (7, "", "other")], 0)
    # more ties than k, spread over segments written in another order than fid order
    for gen, fid in enumerate([8, 4, 6, 5], 1):
        ix.apply([(fid, "", "same words")], [], gen)
    (ties,) = ix.search(["same"], 10)
    assert fids(ties) == [4, 5, 6, 8, 9] and len({s for _, s in ties}) == 1
    assert ix.search(["same"], 2) == [ties[:2]]
    assert ix.search(["same"], 0) == [[]]
    ix.close()


NASTY = [
    "",
    "   ",
    "?",
    '"',
    '"unclosed quote horse',
    "horse AND NOT zebra",
    "OR",
    "(horse",
    "horse)",
    "title:horse",
    "fid:1",
    "body:[a TO z]",
    "horse^2",
    "horse~1",
    "hor*",
    "+horse -zebra",
    "\\",
    "what's the 'zebra'?",
    "東京 zebra",
    "🦓 zebra",
    "x" * 5000,
    "a\x00b",
]


def test_questions_are_words_never_query_syntax(index: LexicalIndex) -> None:
    results = index.search(NASTY, 5)
    assert len(results) == len(NASTY)
    by_query = dict(zip(NASTY, results, strict=True))
    for q in ["", "   ", "?", '"', "OR", "\\", "x" * 5000]:
        assert by_query[q] == [], q  # no terms left (5000 chars: dropped as too long)
    # NOT is a word here, not an operator: the zebra passage still matches
    assert fids(by_query["horse AND NOT zebra"]) == [1, 2]
    assert fids(by_query["title:horse"]) == [2, 1]  # "title" is just a missing word
    assert fids(by_query["fid:1"]) == []  # nor can a question address the fid field
    assert fids(by_query["🦓 zebra"]) == [1]


def test_apply_removes_then_upserts_in_one_commit(index: LexicalIndex) -> None:
    index.apply([(3, "Okapi", "a forest giraffe"), (2, "Horse", "ponies only")], [1], 2)
    assert index.generation == 2
    assert len(index) == 3  # -5, 3 and the new 2; fid 1 gone
    assert index.search(["zebra", "okapi", "runs", "ponies"], 10) == [
        [],
        [(3, pytest.approx(index.search(["okapi"], 1)[0][0][1]))],
        [],  # the old copy of fid 2 is gone
        [(2, pytest.approx(index.search(["ponies"], 1)[0][0][1]))],
    ]
    # replaying the same change (a lagging generation) changes nothing; absent fids are no-ops
    before = index.search(["okapi ponies noth"], 10)
    index.apply([(3, "Okapi", "a forest giraffe"), (2, "Horse", "ponies only")], [1, 1000], 2)
    assert len(index) == 3
    assert fids(index.search(["okapi ponies noth"], 10)[0]) == fids(before[0])


def test_a_fid_in_remove_and_add_is_added(index: LexicalIndex) -> None:
    index.apply([(1, "Zebra", "back again")], [1], 2)
    assert fids(index.search(["again"], 10)[0]) == [1]
    assert len(index) == 3


def test_bad_writes_change_nothing(index: LexicalIndex) -> None:
    with pytest.raises(ValueError, match="twice"):
        index.apply([(3, "", "okapi"), (3, "", "okapi")], [1], 2)
    with pytest.raises(ValueError, match="generation"):
        index.apply([(3, "", "okapi")], [1], -1)
    with pytest.raises(ValueError, match="twice"):
        index.replace_all([(3, "", "okapi"), (3, "", "okapi")], 2)
    # a rolled-back rebuild leaves nothing behind for the next commit either
    index.apply([], [], 2)
    assert (index.generation, len(index)) == (2, 3)
    assert index.search(["okapi"], 5) == [[]]
    assert fids(index.search(["zebra"], 5)[0]) == [1]


def test_a_search_sees_all_of_a_commit_or_none_of_it(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    old = [(i, "", f"common old{i}") for i in range(50)]
    new = [(i, "", f"common new{i}") for i in range(50, 100)]
    ix.replace_all(old, 0)
    seen: set[frozenset[int]] = set()
    stop = threading.Event()

    def searching() -> None:
        while not stop.is_set():
            for hits in ix.search(["common", "common"], 200):
                seen.add(frozenset(fids(hits)))

    t = threading.Thread(target=searching)
    t.start()
    try:
        for gen in range(1, 9):
            add, remove = (new, old) if gen % 2 else (old, new)
            ix.apply(add, [fid for fid, _, _ in remove], gen)
    finally:
        stop.set()
        t.join()
    assert seen <= {frozenset(range(50)), frozenset(range(50, 100))}
    ix.close()


def test_reopen_keeps_generation_and_contents(index: LexicalIndex, tmp_path: Path) -> None:
    index.apply([(3, "Okapi", "a forest giraffe")], [], 7)
    expected = index.search(["okapi horse"], 10)
    index.close()
    again = LexicalIndex.open(tmp_path / "lex")
    assert again.generation == 7
    assert len(again) == 4
    assert again.search(["okapi horse"], 10) == expected
    again.close()


def test_a_lagging_sidecar_reports_the_old_generation(index: LexicalIndex, tmp_path: Path) -> None:
    # a kill -9 between tantivy's commit and the sidecar's rename: the index holds generation 2,
    # the sidecar still says 1
    sidecar = tmp_path / "lex" / SIDECAR
    old = sidecar.read_bytes()
    index.apply([(3, "Okapi", "a forest giraffe")], [1], 2)
    index.close()
    sidecar.write_bytes(old)
    again = LexicalIndex.open(tmp_path / "lex")
    assert again.generation == 1
    assert fids(again.search(["okapi"], 5)[0]) == [3]
    # the owner catches up from generation 1: the replay is idempotent
    again.apply([(3, "Okapi", "a forest giraffe")], [1], 2)
    assert (again.generation, len(again)) == (2, 3)
    again.close()
    assert LexicalIndex.open(tmp_path / "lex").generation == 2


def test_replace_all_rebuilds_in_one_commit(index: LexicalIndex) -> None:
    index.replace_all(((fid, "", f"word{fid}") for fid in (10, 11)), 5)
    assert (index.generation, len(index)) == (5, 2)
    assert index.search(["zebra", "word11"], 5)[0] == []
    assert fids(index.search(["word11"], 5)[0]) == [11]


def test_a_missing_sidecar_or_another_tokenizer_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "lex"
    ix = LexicalIndex.open(path)
    assert (ix.generation, len(ix)) == (-1, 0)
    ix.replace_all(ROWS, 3)
    ix.close()
    plain = LexicalIndex.open(path, tokenizer="default")  # built with en_stem: rebuilt empty
    assert (plain.generation, len(plain)) == (-1, 0)
    plain.replace_all(ROWS, 4)
    assert plain.search(["horses"], 5) == [[]]  # no stemming
    plain.close()
    (path / SIDECAR).unlink()  # a crash before the first sidecar: the files are not trusted
    fresh = LexicalIndex.open(path, tokenizer="default")
    assert (fresh.generation, len(fresh)) == (-1, 0)
    fresh.close()


def test_a_closed_index_refuses_work(index: LexicalIndex) -> None:
    index.close()
    index.close()
    with pytest.raises(RuntimeError, match="closed"):
        index.search(["horse"], 5)
    with pytest.raises(RuntimeError, match="closed"):
        index.apply([], [], 2)
