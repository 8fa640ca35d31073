"""Selector training on transformers' Trainer against the hand-written loop it replaced.

Runs both on the same groups, init, seed and settings (the distill recipe's defaults) for the
first ``--steps`` optimizer steps, and compares the per-step losses. The old loop is read from git
(``--rev``, the last commit that had it), so it is not shipped. Default data: the shipped
distillation groups, rebuilt from ``data/train/gain_signals_k10.jsonl`` as the shipped plan does
(group size 11, seed 0), from the shipped relevance warm start. Writes
``benchmarks/results/train_equivalence.{json,md}``.

    python -m benchmarks.train_equivalence --steps 100 [--no-dropout]

With ``--no-dropout`` (every dropout layer off) the two runs are identical step for step: same
init, data order, loss, AdamW, schedule and clipping. With dropout they differ within noise only:
the Trainer's DataLoader draws its base seed from torch's global RNG, so the dropout masks come
from a shifted stream. Results: ``train_equivalence[_no_dropout].{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, rel, write_result
from gainrag.training.recipes.base import TrainArgs
from gainrag.training.recipes.distill import RECIPE as DISTILL
from gainrag.training.signals.selector_data import iter_groups, read_rows

OLD_REV = "6091e476dce8de6667ed6ceabc0ca7c56ff66e63"  # the last commit with selector_train.py
OLD_PATH = "service/gainrag/training/selector_train.py"


def without_dropout() -> None:
    """Every model loaded from now on has its dropout layers off (p = 0)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    load = AutoModelForSequenceClassification.from_pretrained

    def patched(*a: Any, **kw: Any) -> Any:
        model = load(*a, **kw)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    AutoModelForSequenceClassification.from_pretrained = patched  # type: ignore[method-assign]


def old_losses(
    groups: list[dict[str, Any]], init: Path, args: TrainArgs, steps: int, rev: str, tmp: Path
) -> list[float]:
    """Per-step losses of the old loop (from git) for its first ``steps`` steps."""
    src = subprocess.run(
        ["git", "show", f"{rev}:{OLD_PATH}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = tmp / "old_selector_train.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_selector_train", path)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up while it executes
    spec.loader.exec_module(old)
    losses: list[float] = []
    step_loss = old._step_loss

    def recording(*a: Any, **kw: Any) -> Any:
        loss = step_loss(*a, **kw)
        losses.append(float(loss.detach()))
        return loss

    old._step_loss = recording
    cfg = old.TrainConfig(
        loss="kl",
        lr=args.lr,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        groups_per_step=args.groups_per_step,
        seed=args.seed,
        save_every=10**9,
    )
    old.train_selector(init, groups, tmp / "old", cfg, show_progress=False, stop_after_steps=steps)
    return losses[:steps]


def new_losses(
    groups: list[dict[str, Any]], init: Path, args: TrainArgs, steps: int, tmp: Path
) -> list[float]:
    """Per-step losses of the Trainer-based runner for its first ``steps`` steps."""
    from transformers import TrainerCallback

    from gainrag.training.trainer import train_selector

    losses: list[float] = []

    class Record(TrainerCallback):  # type: ignore[misc]
        def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    train_selector(
        DISTILL,
        init,
        groups,
        tmp / "new",
        args,
        show_progress=False,
        stop_after_steps=steps,
        callbacks=[Record()],
    )
    return losses[:steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--signals", type=Path, default=ROOT / "data/train/gain_signals_k10.jsonl")
    p.add_argument("--group-size", type=int, default=11)
    p.add_argument("--init", type=Path, default=ROOT / "models/selector/relevance-minilm-l6")
    p.add_argument("--max-length", type=int, default=TrainArgs.max_length)
    p.add_argument("--rev", default=OLD_REV, help="git revision of the old loop")
    p.add_argument("--no-dropout", action="store_true", help="dropout off in both runs")
    a = p.parse_args()
    if a.no_dropout:
        without_dropout()
    groups = list(iter_groups(read_rows(a.signals), a.group_size, seed=0))
    args = TrainArgs(max_length=a.max_length)  # the distill recipe's defaults
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        old = old_losses(groups, a.init, args, a.steps, a.rev, Path(d))
        old_s = time.perf_counter() - t
        t = time.perf_counter()
        new = new_losses(groups, a.init, args, a.steps, Path(d))
        new_s = time.perf_counter() - t
    diffs = [abs(x - y) for x, y in zip(old, new, strict=True)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    results = {
        "steps": a.steps,
        "dropout": not a.no_dropout,
        "groups": len(groups),
        "group_size": a.group_size,
        "init": rel(a.init),
        "config": DISTILL.config(args),
        "old_rev": a.rev,
        "old_losses": old,
        "new_losses": new,
        "max_abs_diff": max(diffs),
        "mean_abs_diff": mean(diffs),
        "old_mean_loss": mean(old),
        "new_mean_loss": mean(new),
        "old_seconds": round(old_s, 1),
        "new_seconds": round(new_s, 1),
    }
    md = (
        f"| | old loop ({a.rev[:7]}) | Trainer |\n|---|---|---|\n"
        f"| mean loss, steps 1-{a.steps} | {mean(old):.6f} | {mean(new):.6f} |\n"
        f"| loss at step 1 / {a.steps} | {old[0]:.6f} / {old[-1]:.6f} | "
        f"{new[0]:.6f} / {new[-1]:.6f} |\n"
        f"| wall time (s) | {old_s:.0f} | {new_s:.0f} |\n\n"
        f"Per-step |old - new|: max {max(diffs):.2e}, mean {mean(diffs):.2e} over {a.steps} steps "
        f"({len(groups)} groups of {a.group_size}, KL, lr {args.lr}, max length {args.max_length})."
    )
    md += " Dropout off in both." if a.no_dropout else " Dropout on (default)."
    name = "train_equivalence" + ("_no_dropout" if a.no_dropout else "")
    write_result(name, results, markdown=md)


if __name__ == "__main__":
    sys.exit(main())
