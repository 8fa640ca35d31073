"""What a runner needs of a recipe: the optimisation settings and the loss (no torch at import).

The runners (``trainer.py``'s ``Trainer``, ``dro_loop.py``'s rounds) and the recipes
(``recipes/base.py``) both import this module; neither imports the other at module level, so a
recipe module stays importable without torch and the runner never reaches back into the recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

TRAIN_HELP = {
    "lr": "peak learning rate (AdamW, linear warmup and decay)",
    "epochs": "passes over the groups",
    "warmup_ratio": "share of the steps spent warming up the learning rate",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorm weights)",
    "max_length": "tokens per (query, passage) pair",
    "groups_per_step": "groups per device and forward pass",
    "grad_accum": "forward passes per optimizer step (gradient accumulation)",
    "precision": (
        "training precision: fp32, or bf16/fp16 mixed precision (GPU; bf16 also on CPUs with"
        " AVX-512 BF16 or AMX, ~12%% faster than fp32 for MiniLM on a Zen 5)"
    ),
    "seed": "seed of the head's init, dropout and the data order",
    "save_every": "checkpoint every N optimizer steps (resumed from automatically)",
    "fp16_output": "ship the final weights as fp16 safetensors",
    "deepspeed": "DeepSpeed config JSON (launch with deepspeed or torchrun)",
}


@dataclass(kw_only=True)
class TrainArgs:
    """Optimisation settings (defaults: GainRAG's reference recipe); recorded with the model."""

    lr: float = 6e-5
    epochs: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 512
    groups_per_step: int = 1
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    save_every: int = 200
    fp16_output: bool = True
    deepspeed: Path | None = None


class GroupLoss(Protocol):
    """The part of a recipe the group runner calls (``recipes.base.Recipe`` is one)."""

    @property
    def name(self) -> str:
        """The recipe's name, recorded as ``recipe`` in ``gainrag_training.json``."""
        ...

    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Loss of one group: ``scores`` (n,) with the positive first; ``teacher`` (n,) or None."""
        ...

    def config(self, args: TrainArgs) -> dict[str, Any]:
        """The training settings as recorded in ``gainrag_training.json``."""
        ...
