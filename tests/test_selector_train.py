"""Selector training: loss math, a tiny real run, exact resume, and loading the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gainrag.models import resolve_encoder
from gainrag.selector.cross_encoder import CrossEncoderSelector
from gainrag.training.selector_train import TrainConfig, group_loss, load_groups, train_selector
from gainrag.types import Passage


def test_infonce_is_cross_entropy_on_the_positive() -> None:
    s = torch.tensor([2.0, 1.0, 0.0])
    want = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    assert group_loss(s, None, "infonce").item() == pytest.approx(want, rel=1e-6)


def test_kl_matches_its_definition() -> None:
    s = torch.tensor([0.5, -1.0, 2.0])
    t = torch.tensor([-1.1, -2.3, -0.7])  # teacher labels, -log(ppl+1)
    p, q = torch.softmax(t, 0), torch.softmax(s, 0)
    want = float((p * (p.log() - q.log())).sum())
    assert group_loss(s, t, "kl").item() == pytest.approx(want, rel=1e-5)
    assert group_loss(t, t, "kl").item() == pytest.approx(0.0, abs=1e-6)  # Q = P
    with pytest.raises(ValueError, match="teacher"):
        group_loss(s, None, "kl")


GROUPS = [
    {
        "query": "who discovered x-rays",
        "pos": ["Röntgen\nWilhelm Röntgen discovered X-rays."],
        "neg": ["Deadpool\nA film from 2018.", "Hops\nHops grow in Washington.", "Tom\nA cat."],
        "pos_scores": [-0.5],
        "neg_scores": [-3.0, -2.5, -2.8],
    },
    {
        "query": "where do hops grow",
        "pos": ["Hops\nHops grow in Washington."],
        "neg": ["Tom\nA cat.", "Röntgen\nX-rays.", "Deadpool\nA film."],
        "pos_scores": [-0.7],
        "neg_scores": [-2.0, -2.9, -3.1],
    },
    {
        "query": "what is deadpool",
        "pos": ["Deadpool\nA film from 2018."],
        "neg": ["Hops\nHops grow.", "Tom\nA cat.", "Röntgen\nX-rays."],
        "pos_scores": [-0.4],
        "neg_scores": [-2.2, -2.6, -3.3],
    },
]
CFG = TrainConfig(loss="kl", lr=5e-5, epochs=2, max_length=64, save_every=100, fp16_output=True)


def test_tiny_training_run_resumes_exactly_and_loads(tmp_path: Path) -> None:
    init = resolve_encoder("all-MiniLM-L6-v2")
    full = tmp_path / "full"
    meta = train_selector(init, GROUPS, full, CFG, show_progress=False)
    assert meta is not None and meta["steps"] == 6
    assert not (tmp_path / "full.work").exists()

    split = tmp_path / "split"
    assert train_selector(init, GROUPS, split, CFG, show_progress=False, stop_after_steps=4) is None
    assert (tmp_path / "split.work" / "state.pt").exists() and not split.exists()
    assert train_selector(init, GROUPS, split, CFG, show_progress=False) is not None

    with (
        safe_open(str(full / "model.safetensors"), "pt") as a,
        safe_open(str(split / "model.safetensors"), "pt") as b,
    ):
        names = list(a.keys())
        assert all(a.get_tensor(n).dtype == torch.float16 for n in names)  # shipped as fp16
        for n in names:
            torch.testing.assert_close(a.get_tensor(n), b.get_tensor(n))  # resume is exact
    card = json.loads((full / "gainrag_training.json").read_text())
    assert card["config"]["loss"] == "kl" and card["groups"] == 3


async def test_trained_checkpoint_serves_as_the_selector(tmp_path: Path) -> None:
    out = tmp_path / "sel"
    cfg = TrainConfig(loss="infonce", lr=1e-4, epochs=3, max_length=64)
    train_selector(resolve_encoder("all-MiniLM-L6-v2"), GROUPS, out, cfg, show_progress=False)
    sel = CrossEncoderSelector(out)
    assert next(sel.scorer.model.parameters()).dtype == torch.float32  # fp16 file, fp32 on CPU
    scores = await sel.score(
        "who discovered x-rays",
        [
            Passage("a", "Röntgen", "Wilhelm Röntgen discovered X-rays."),
            Passage("b", "Tom", "A cat."),
        ],
    )
    assert scores[0] > scores[1]  # it learned the training example
    await sel.close()


def test_bad_group_files_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n')
    with pytest.raises(ValueError, match="needs query, pos and neg"):
        load_groups(bad)
