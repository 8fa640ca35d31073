"""The selectors shipped in the repo: format, size, model card, and that they rank sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from gainrag.config import REPO_ROOT, Settings
from gainrag.selector.cross_encoder import CrossEncoderScorer, checkpoint_version

SHIPPED = [
    REPO_ROOT / "models/selector/gainrag-minilm-l6",
    REPO_ROOT / "models/selector/relevance-minilm-l6",
]
Q = "who got the first nobel prize in physics"
GOLD = (
    "Nobel Prize in Physics\nThe first Nobel Prize in Physics was awarded in 1901 to Wilhelm "
    "Conrad Röntgen, of Germany, for the discovery of the remarkable rays subsequently named "
    "after him."
)
OFF_TOPIC = (
    "Deadpool 2\nDeadpool 2 is a 2018 American superhero film based on the Marvel Comics "
    "character Deadpool. It was released in the United States on May 18, 2018."
)


def test_defaults_point_at_the_shipped_selectors() -> None:
    s = Settings().selector
    assert [s.checkpoint, s.rerank_checkpoint] == SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_is_small_fp16_safetensors(path: Path) -> None:
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 50 * 1024 * 1024
    with safe_open(str(weights), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    config = json.loads((path / "config.json").read_text())
    assert len(config["id2label"]) == 1  # one logit: the selector's score
    card = (path / "README.md").read_text()
    assert "gainrag train" in card  # the exact commands that made it


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_selector_prefers_the_passage_that_answers(path: Path) -> None:
    scorer = CrossEncoderScorer(path, max_length=256, batch_size=4)
    gold, off = scorer.score_pairs([(Q, GOLD), (Q, OFF_TOPIC)])
    assert gold > off


def test_checkpoint_version_is_content_based(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    v = checkpoint_version(a)
    (a / "config.json").write_text("{}")  # rewritten (new mtime), same bytes
    assert checkpoint_version(a) == v
    (a / "config.json").write_text('{"x": 1}')
    assert checkpoint_version(a) != v
