"""``radio``: RADIO's reranker fine-tune, InfoNCE on rationale-re-ranked groups.

Groups come from a ``gainrag train rationales`` file: each question's top-k passages re-ranked by
``alpha * minmax(rationale similarity) + (1 - alpha) * minmax(retrieval score)``; the positive is
rank 0, the negatives are ranks 3, 4, 6, 9, 13, 18 (``training/radio.py``). The loss is softmax
cross-entropy with the positive as the target; lr 6e-5 and 2 epochs (``TrainArgs``' defaults)
from the relevance warm start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gainrag.config import Settings
from gainrag.errors import ConfigurationError
from gainrag.training.recipes.base import Recipe, TrainArgs

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class RadioInputs:
    """A rationales file, the mixing weight, and the warm start."""

    rationales: Path = field(metadata={"help": "JSONL from `gainrag train rationales`"})
    alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the rationale similarity (1: without the retrieval score)"},
    )
    init: Path | None = field(
        default=None,
        metadata={
            "help": "relevance warm-start checkpoint (default: GAINRAG_SELECTOR__RERANK_CHECKPOINT)"
        },
    )


class Radio(Recipe):
    """InfoNCE on RADIO's groups."""

    name = "radio"
    summary = "RADIO: InfoNCE, rank 0 vs ranks 3,4,6,9,13,18 after rationale re-ranking"
    loss = "infonce"
    train_args = TrainArgs  # RADIO's lr 6e-5, 2 epochs are the reference defaults
    inputs = RadioInputs

    def load_groups(
        self, settings: Settings, inputs: RadioInputs, args: TrainArgs
    ) -> tuple[list[dict[str, Any]], str]:
        """One group per question of ``--rationales`` with at least one negative rank."""
        from gainrag.training.radio import radio_group

        groups: list[dict[str, Any]] = []
        rows = 0
        with inputs.rationales.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows += 1
                    group = radio_group(json.loads(line), inputs.alpha)
                    if group is not None:
                        groups.append(group)
        if not groups:
            raise ConfigurationError(f"{inputs.rationales} gives no groups")
        sizes = sorted({1 + len(g["neg"]) for g in groups})
        return groups, (
            f"radio: {len(groups)} groups (sizes {sizes}) from {rows} questions, "
            f"alpha {inputs.alpha}"
        )

    def resolve_init(self, settings: Settings, inputs: RadioInputs) -> Path:
        """``--init``, else the settings' relevance checkpoint; it must exist."""
        init = inputs.init or settings.selector.rerank_checkpoint
        if not (init / "config.json").is_file():
            raise ConfigurationError(f"no warm-start checkpoint at {init} (--init)")
        return init

    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy with the positive (index 0) as the target."""
        return -scores.float().log_softmax(dim=-1)[0]


RECIPE = Radio()
