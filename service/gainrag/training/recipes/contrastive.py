"""``contrastive``: the relevance warm start, InfoNCE on labelled groups.

Each group is a question's gold passage (the positive) against hard negatives mined from the
retriever (``training/relevance_data.py``); the loss is cross-entropy with the positive as the
target. Its output is the ``rerank`` baseline and the starting point of ``distill``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gainrag.config import Settings
from gainrag.training.recipes.base import Recipe, TrainArgs

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class ContrastiveInputs:
    """Questions with gold passages, how to mine negatives, and the encoder to start from."""

    questions: list[Path] = field(metadata={"help": "JSONL files with question, answers, gold_ids"})
    limit: int | None = field(
        default=None, metadata={"help": "questions per file (seeded random sample)"}
    )
    init: str = field(
        default="all-MiniLM-L6-v2",
        metadata={"help": "bare encoder (bundled name or directory) or a checkpoint"},
    )
    group_size: int = field(
        default=16, metadata={"help": "passages per group: the gold and N-1 negatives"}
    )
    k: int = field(default=50, metadata={"help": "retrieved passages to mine negatives"})


@dataclass(kw_only=True)
class ContrastiveArgs(TrainArgs):
    """A gentler, shorter schedule than distillation's."""

    lr: float = 3e-5
    epochs: int = 1


class Contrastive(Recipe):
    """InfoNCE on gold-vs-hard-negative groups."""

    name = "contrastive"
    aliases = ("relevance",)
    summary = "relevance warm start: InfoNCE, gold passage vs mined hard negatives"
    loss = "infonce"
    train_args = ContrastiveArgs
    inputs = ContrastiveInputs

    def load_groups(
        self, settings: Settings, inputs: ContrastiveInputs, args: TrainArgs
    ) -> tuple[list[dict[str, Any]], str]:
        """Mine one group per question from the retriever of the settings."""
        from gainrag.retrieval.encoder import BiEncoder
        from gainrag.retrieval.local import LocalRetriever
        from gainrag.training.questions import training_questions
        from gainrag.training.relevance_data import relevance_groups

        r = settings.retrieval
        retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
        questions = training_questions(inputs.questions, inputs.limit, args.seed)
        groups = relevance_groups(
            retriever, questions, group_size=inputs.group_size, k=inputs.k, seed=args.seed
        )
        return groups, f"relevance: {len(groups)} groups from {len(questions)} questions"

    def resolve_init(self, settings: Settings, inputs: ContrastiveInputs) -> Path:
        """A bundled encoder's directory, or the path given."""
        from gainrag.weights import resolve_encoder

        return resolve_encoder(inputs.init)

    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy with the positive (index 0) as the target."""
        return -scores.float().log_softmax(dim=-1)[0]


RECIPE = Contrastive()
