"""Index build and search on the real all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gainrag.cli import main
from gainrag.errors import ConfigurationError
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import PassageIndex, build_index, read_manifest
from gainrag.retrieval.local import LocalRetriever
from gainrag.util import file_sha256


def test_encoder_gives_unit_vectors_independent_of_batching(encoder: BiEncoder) -> None:
    texts = ["short", "a somewhat longer sentence about physics prizes", "Paris\nFrance's capital"]
    together = encoder.encode(texts, batch_size=8)
    alone = np.vstack([encoder.encode([t]) for t in texts])
    assert together.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_manifest_describes_the_index(index_dir: Path, small_corpus: Path) -> None:
    m = read_manifest(index_dir)
    assert m is not None
    n = sum(1 for line in small_corpus.open() if line.strip())
    assert m["count"] == n
    assert m["encoder"] == "all-MiniLM-L6-v2"
    assert m["dim"] == 384 and m["metric"] == "inner_product" and m["normalized"] is True
    assert m["corpus_sha256"] == file_sha256(small_corpus)
    assert len(m["version"]) == 12


def test_search_scores_are_cosine_and_sorted(index_dir: Path, encoder: BiEncoder) -> None:
    idx = PassageIndex.load(index_dir)
    q = encoder.encode(["who got the first nobel prize in physics"])
    (hits,) = idx.search(q, 5)
    assert [h.rank for h in hits] == list(range(5))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:  # the score is exactly the inner product of unit vectors
        p = encoder.encode([h.passage.as_candidate_text()])[0]
        assert h.score == pytest.approx(float(q[0] @ p), abs=1e-4)


async def test_gold_passages_are_retrieved(
    index_dir: Path, encoder: BiEncoder, dev_questions: list[dict]
) -> None:
    retriever = LocalRetriever(encoder, PassageIndex.load(index_dir))
    found = 0
    for q in dev_questions:
        hits = await retriever.retrieve(q["question"], 10)
        assert len(hits) == 10
        found += any(h.passage.id in q["gold_ids"] for h in hits)
    await retriever.close()
    # MiniLM finds most NQ gold passages in a 250-passage corpus; a broken index finds ~none.
    assert found >= len(dev_questions) * 3 // 4


async def test_concurrent_queries_share_one_search(index_dir: Path, encoder: BiEncoder) -> None:
    import asyncio

    retriever = LocalRetriever(encoder, PassageIndex.load(index_dir))
    qs = ["nobel prize physics", "deadpool release", "hops in the us", "greys anatomy crash"]
    together = await asyncio.gather(*(retriever.retrieve(q, 3) for q in qs))
    assert retriever.batcher.stats.batches < len(qs)
    for q, got in zip(qs, together, strict=True):
        alone = retriever.search_many([q], 3)[0]
        assert [h.passage.id for h in got] == [h.passage.id for h in alone]
    await retriever.close()


def test_cli_build_skips_up_to_date_index_and_rebuilds_on_force(
    tmp_path: Path, small_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = small_corpus.read_text().splitlines()[:20]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "idx"
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out)]) == 0
    assert "built index" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["count"] == 20
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--force"]) == 0
    assert "built index" in capsys.readouterr().out


def test_bad_corpus_and_missing_index_fail_clearly(tmp_path: Path, encoder: BiEncoder) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "title": "t"}\n')  # no text
    with pytest.raises(ConfigurationError, match="not a passage row"):
        build_index(bad, tmp_path / "i", encoder, show_progress=False)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n')
    with pytest.raises(ConfigurationError, match="duplicate"):
        build_index(dup, tmp_path / "i", encoder, show_progress=False)
    with pytest.raises(ConfigurationError, match="gainrag index build"):
        PassageIndex.load(tmp_path / "nowhere")
