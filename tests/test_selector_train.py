"""Selector training: loss math, a tiny real run, exact resume, loading the result, and equality
with the hand-written loop the Trainer-based runner replaced."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from gainrag.selector.cross_encoder import CrossEncoderSelector
from gainrag.training.recipes.base import TrainArgs
from gainrag.training.recipes.contrastive import RECIPE as CONTRASTIVE
from gainrag.training.recipes.contrastive import ContrastiveArgs
from gainrag.training.recipes.distill import RECIPE as DISTILL
from gainrag.training.trainer import load_groups, train_selector
from gainrag.types import Passage
from gainrag.weights import resolve_encoder


def test_infonce_is_cross_entropy_on_the_positive() -> None:
    s = torch.tensor([2.0, 1.0, 0.0])
    want = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    assert CONTRASTIVE.group_loss(s, None).item() == pytest.approx(want, rel=1e-6)


def test_kl_matches_its_definition() -> None:
    s = torch.tensor([0.5, -1.0, 2.0])
    t = torch.tensor([-1.1, -2.3, -0.7])  # teacher labels, -log(ppl+1)
    p, q = torch.softmax(t, 0), torch.softmax(s, 0)
    want = float((p * (p.log() - q.log())).sum())
    assert DISTILL.group_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    assert DISTILL.group_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)  # Q = P
    with pytest.raises(ValueError, match="teacher"):
        DISTILL.group_loss(s, None)


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
CFG = TrainArgs(lr=5e-5, epochs=2, max_length=64, save_every=100, fp16_output=True)


def test_tiny_training_run_resumes_exactly_and_loads(tmp_path: Path) -> None:
    init = resolve_encoder("all-MiniLM-L6-v2")
    full = tmp_path / "full"
    meta = train_selector(DISTILL, init, GROUPS, full, CFG, show_progress=False)
    assert meta is not None and meta["steps"] == 6
    assert not (tmp_path / "full.work").exists()

    split = tmp_path / "split"
    stopped = train_selector(
        DISTILL, init, GROUPS, split, CFG, show_progress=False, stop_after_steps=4
    )
    assert stopped is None
    # a Trainer checkpoint (weights, optimizer, schedule, RNG) to resume from, no output yet
    assert get_last_checkpoint(str(tmp_path / "split.work")) is not None and not split.exists()
    assert train_selector(DISTILL, init, GROUPS, split, CFG, show_progress=False) is not None

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


def test_bf16_mixed_precision_trains_without_a_gpu(tmp_path: Path) -> None:
    # Trainer refuses bf16 without CUDA unless told it runs on the CPU (torch's CPU autocast)
    cfg = TrainArgs(lr=5e-5, epochs=1, max_length=64, precision="bf16")
    init = resolve_encoder("all-MiniLM-L6-v2")
    meta = train_selector(DISTILL, init, GROUPS, tmp_path / "bf16", cfg, show_progress=False)
    assert meta is not None and meta["steps"] == 3
    assert meta["config"]["precision"] == "bf16"
    assert math.isfinite(meta["loss_last_50"])


async def test_trained_checkpoint_serves_as_the_selector(tmp_path: Path) -> None:
    out = tmp_path / "sel"
    cfg = ContrastiveArgs(lr=1e-4, epochs=3, max_length=64)
    init = resolve_encoder("all-MiniLM-L6-v2")
    train_selector(CONTRASTIVE, init, GROUPS, out, cfg, show_progress=False)
    sel = CrossEncoderSelector(out)
    # fp16 file; on CPU auto runs fp32 or bf16, never fp16 (slow there)
    assert next(sel.scorer.model.parameters()).dtype == sel.scorer.dtype.torch_dtype
    assert sel.scorer.dtype.torch_dtype in (torch.float32, torch.bfloat16)
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


# Per-step losses of the hand-written torch loop this runner replaced (commit 6091e47,
# service/gainrag/training/selector_train.py) on GROUPS with CFG, dropout off: produced by
# benchmarks/train_equivalence.py's old_losses(). With dropout the two differ within noise only
# (the DataLoader draws its seed from torch's RNG, shifting the dropout masks; docs/training.md).
OLD_LOOP_LOSSES = [0.5845917, 0.5862811, 0.4554513, 0.4457868, 0.5607293, 0.5390977]


def test_trainer_matches_the_original_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load = AutoModelForSequenceClassification.from_pretrained

    def without_dropout(*a: object, **kw: object) -> torch.nn.Module:
        model = load(*a, **kw)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", without_dropout)
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    init = resolve_encoder("all-MiniLM-L6-v2")
    train_selector(
        DISTILL, init, GROUPS, tmp_path / "m", CFG, show_progress=False, callbacks=[Record()]
    )
    # same head init, data order, loss, AdamW, warmup/decay and clipping, step for step
    assert losses == pytest.approx(OLD_LOOP_LOSSES, abs=1e-4)
