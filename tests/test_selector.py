"""The selector interface with both implementations: cross-encoder and cosine fallback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import PassageIndex
from gainrag.selector.cosine import CosineSelector
from gainrag.selector.cross_encoder import CrossEncoderSelector
from gainrag.types import Passage
from gainrag.weights import resolve_encoder

CANDIDATES = [
    Passage("p1", "Nobel Prize in Physics", "The first prize went to Wilhelm Röntgen in 1901."),
    Passage("p2", "Deadpool 2", "Deadpool 2 was released on May 18, 2018."),
    Passage("pseudo", "", "Röntgen discovered X-rays and won the first Nobel Prize.", pseudo=True),
]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MiniLM cross-encoder with a seeded, untrained one-logit head (the shape of a real one)."""
    src = resolve_encoder("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    out = tmp_path_factory.mktemp("ce") / "minilm-ce"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


async def test_cross_encoder_scores_match_a_direct_forward_pass(cross_encoder_dir: Path) -> None:
    sel = CrossEncoderSelector(cross_encoder_dir, batch_size=2, dtype="float32")
    q = "who got the first nobel prize in physics"
    scores = await sel.score(q, CANDIDATES)
    tok = AutoTokenizer.from_pretrained(cross_encoder_dir)
    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder_dir).eval()
    with torch.inference_mode():
        for c, s in zip(CANDIDATES, scores, strict=True):
            enc = tok(q, f"{c.title}\n{c.text}", return_tensors="pt")
            assert s == pytest.approx(model(**enc).logits.item(), abs=1e-4)
    assert await sel.score(q, []) == []
    await sel.close()


async def test_cross_encoder_batches_concurrent_requests(cross_encoder_dir: Path) -> None:
    sel = CrossEncoderSelector(
        cross_encoder_dir, batch_size=16, max_batch_pairs=64, max_wait_s=0.05
    )
    questions = [f"question number {i} about prizes" for i in range(6)]
    together = await asyncio.gather(*(sel.score(q, CANDIDATES) for q in questions))
    assert sel.batcher.stats.batches < len(questions)
    for q, got in zip(questions, together, strict=True):
        alone = sel.scorer.score_pairs([(q, c.as_candidate_text()) for c in CANDIDATES])
        np.testing.assert_allclose(got, alone, atol=1e-4)
    await sel.close()


def test_cross_encoder_rejects_multi_label_checkpoints(tmp_path: Path) -> None:
    src = resolve_encoder("all-MiniLM-L6-v2")
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=2).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=1"):
        CrossEncoderSelector(tmp_path)


async def test_relevance_selector_is_cosine(encoder: BiEncoder) -> None:
    sel = CosineSelector(encoder)
    q = "who got the first nobel prize in physics"
    scores = await sel.score(q, CANDIDATES)
    vecs = encoder.encode([q] + [c.as_candidate_text() for c in CANDIDATES])
    np.testing.assert_allclose(scores, vecs[1:] @ vecs[0], atol=1e-5)
    assert scores[0] > scores[1]  # the relevant passage beats the unrelated one
    await sel.close()


async def test_relevance_reuses_index_vectors(encoder: BiEncoder, index_dir: Path) -> None:
    index = PassageIndex.load(index_dir)
    with_index = CosineSelector(encoder, index)
    without = CosineSelector(encoder)
    cands = [*index.passages[:5], CANDIDATES[2]]
    q = "where do they grow hops in the us"
    a = await with_index.score(q, cands)
    b = await without.score(q, cands)
    np.testing.assert_allclose(a, b, atol=1e-5)
    await with_index.close()
    await without.close()


def test_encoder_names_resolve_to_bundled_weights() -> None:
    assert (resolve_encoder("all-MiniLM-L6-v2") / "model.safetensors").is_file()
