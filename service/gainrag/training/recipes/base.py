"""The abstract selector recipe: arguments, data, loss, runner (by default ``training.trainer``).

Modelled on FlagEmbedding's ``abc/finetune/reranker`` split (arguments, dataset, modeling,
runner). A recipe subclasses only what differs:

* ``TrainArgs``: optimisation settings; its defaults are GainRAG's reference recipe, and a
  recipe's subclass changes a default by redeclaring the field;
* ``inputs``: a dataclass of what the recipe reads (the starting checkpoint, its data);
* ``load_groups`` / ``resolve_init``: groups in FlagEmbedding's reranker format
  ``{"query", "pos", "neg"[, "pos_scores", "neg_scores"]}`` and the checkpoint to start from;
* ``group_loss``: the loss of one group's scores (positive first), the overridable method;
* ``check`` / ``train`` / ``report``: the runner's hooks, called by ``run`` in that order around
  the data. ``train`` defaults to the group runner (``trainer.train_selector``); a recipe whose
  targets the group loop cannot express overrides it with its own loop (``dro``: the rounds of
  ``dro_loop.py``), ``check`` with the options that loop refuses, ``report`` with what it prints.

The group runner scores each group's ``1 + len(neg)`` pairs with the cross-encoder and averages
``group_loss`` over the groups of a step; the optimisation loop is transformers' ``Trainer``.
``TrainArgs`` lives in ``training/recipe_spec.py`` with what the runner needs of a recipe (the
runners import that module, never this one); recipes take it from here.
"""

from __future__ import annotations

import argparse
from abc import abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gainrag.config import Settings
from gainrag.training.recipe_spec import TRAIN_HELP, TrainArgs
from gainrag.training.registry import Job, add_dataclass_arguments, from_args

if TYPE_CHECKING:
    import torch


class Recipe(Job):
    """A selector training recipe: ``gainrag train <name>``."""

    loss: ClassVar[str]  # the loss's name, recorded as config["loss"] in gainrag_training.json
    train_args: ClassVar[type[TrainArgs]] = TrainArgs
    inputs: ClassVar[type]  # dataclass: what the recipe reads

    @abstractmethod
    def load_groups(
        self, settings: Settings, inputs: Any, args: TrainArgs
    ) -> tuple[list[dict[str, Any]], str]:
        """The training groups, and a line saying what they are (printed)."""

    @abstractmethod
    def resolve_init(self, settings: Settings, inputs: Any) -> Path:
        """The checkpoint (or bare encoder) to start from."""

    @abstractmethod
    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Loss of one group: ``scores`` (n,) with the positive first; ``teacher`` (n,) or None."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The recipe's inputs, its training arguments, ``--out`` and ``--stop-after-steps``."""
        add_dataclass_arguments(parser, self.inputs)
        add_dataclass_arguments(parser, self.train_args, TRAIN_HELP)
        parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
        parser.add_argument(
            "--stop-after-steps", type=int, help="end this run early (resumable), to time-box it"
        )

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        """Load the data, train, and write the checkpoint to ``--out``."""
        inputs: Any = from_args(self.inputs, args)
        targs = from_args(self.train_args, args)
        self.check(inputs, targs, args.stop_after_steps)
        init = self.resolve_init(settings, inputs)  # before the data: fail fast on a bad --init
        groups, note = self.load_groups(settings, inputs, targs)
        print(note)
        meta = self.train(
            settings, inputs, targs, init, groups, args.out, stop_after_steps=args.stop_after_steps
        )
        if meta is None:
            print(f"stopped after {args.stop_after_steps} steps; rerun the same command to resume")
            return
        print(self.report(meta, inputs, args.out))

    def check(self, inputs: Any, args: TrainArgs, stop_after_steps: int | None) -> None:
        """Refuse options the runner cannot honour, before any data is loaded (none here)."""

    def train(
        self,
        settings: Settings,
        inputs: Any,
        args: TrainArgs,
        init: Path,
        groups: list[dict[str, Any]],
        out: Path,
        *,
        stop_after_steps: int | None = None,
    ) -> dict[str, Any] | None:
        """The runner: train from ``init`` on ``groups`` into ``out``; the metadata written, or
        None if stopped early (resumable). Here the group runner, ``trainer.train_selector``."""
        from gainrag.training.trainer import train_selector  # torch + transformers: on use

        return train_selector(
            self,
            init,
            groups,
            out,
            args,
            stop_after_steps=stop_after_steps,
            extra_meta={"inputs": self.describe_inputs(inputs)},
        )

    def report(self, meta: dict[str, Any], inputs: Any, out: Path) -> str:
        """What a finished run prints: where the checkpoint went and how the loss moved."""
        return (
            f"selector checkpoint -> {out} ({meta['steps']} steps, loss "
            f"{meta['loss_first_50']:.4f} -> {meta['loss_last_50']:.4f})"
        )

    def describe_inputs(self, inputs: Any) -> dict[str, Any]:
        """The recipe's inputs as recorded in ``gainrag_training.json`` (``inputs``)."""
        return {k: _jsonable(v) for k, v in asdict(inputs).items()}

    def config(self, args: TrainArgs) -> dict[str, Any]:
        """The training settings as recorded in ``gainrag_training.json``."""
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}
        return {"loss": self.loss, **values}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
