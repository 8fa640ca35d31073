"""``distill``: GainRAG's selector, KL distillation of gain labels from a relevance warm start.

Groups come from ``gainrag train selector-data`` (label v = -log(ppl + 1), the best candidate
first); the loss is KL(P || Q), P = softmax(teacher scores), Q = softmax(student scores). Not
FlagEmbedding's distillation loss, which adds a hard cross-entropy term to the soft one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gainrag.config import Settings
from gainrag.errors import ConfigurationError
from gainrag.training.recipes.base import Recipe, TrainArgs

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class DistillInputs:
    """A groups file with teacher scores, and the warm start."""

    groups: Path = field(
        metadata={"help": "selector-data JSONL (groups with pos_scores / neg_scores)"}
    )
    init: Path | None = field(
        default=None,
        metadata={
            "help": "relevance warm-start checkpoint (default: GAINRAG_SELECTOR__RERANK_CHECKPOINT)"
        },
    )


class Distill(Recipe):
    """KL on teacher scores."""

    name = "distill"
    aliases = ("selector",)
    summary = "GainRAG: KL(softmax(gain labels) || softmax(scores)) from a warm start"
    loss = "kl"
    train_args = TrainArgs  # the reference recipe's defaults
    inputs = DistillInputs

    def load_groups(
        self, settings: Settings, inputs: DistillInputs, args: TrainArgs
    ) -> tuple[list[dict[str, Any]], str]:
        """The groups of ``--groups``."""
        from gainrag.training.trainer import load_groups

        groups = load_groups(inputs.groups)
        return groups, f"distill: {len(groups)} groups from {inputs.groups}"

    def resolve_init(self, settings: Settings, inputs: DistillInputs) -> Path:
        """``--init``, else the settings' relevance checkpoint; it must exist."""
        init = inputs.init or settings.selector.rerank_checkpoint
        if not (init / "config.json").is_file():
            raise ConfigurationError(f"no warm-start checkpoint at {init} (--init)")
        return init

    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """KL(P || Q) over the group."""
        if teacher is None:
            raise ValueError("KL distillation needs teacher scores (pos_scores / neg_scores)")
        log_q = scores.float().log_softmax(dim=-1)
        p = teacher.float().softmax(dim=-1)
        # KL(P || Q) = sum p (log p - log q); xlogy makes 0 * log 0 = 0
        return (p.xlogy(p) - p * log_q).sum()


RECIPE = Distill()
