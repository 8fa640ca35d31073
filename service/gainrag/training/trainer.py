"""The runner of every selector recipe: groups -> one-logit cross-encoder, on transformers' Trainer.

The library brings device placement (CUDA when present), mixed precision, gradient accumulation,
multi-GPU (torchrun / DeepSpeed), checkpoints and resume; a recipe brings its data and its
``group_loss`` (``recipe_spec.GroupLoss``: this module never imports the recipes). What this
module adds to ``Trainer``:

* a group collator: each group's ``1 + len(neg)`` (query, passage) pairs, tokenised together,
  with the group sizes and, when every group has them, the teacher scores;
* ``compute_loss``: the mean of the recipe's ``group_loss`` over the step's groups;
* the data order of the original loop (a seeded shuffle per epoch, ``random.Random(seed +
  epoch)``) and its warmup (``int(ratio * steps)``; ``TrainingArguments`` would round up), so a
  run reproduces the checkpoints made before the move to ``Trainer`` (docs/training.md);
* the model is created by ``model_init`` so that it is seeded exactly as before: seed, head
  init, then dropout from the same generator.

Checkpoints go to ``<out>.work/checkpoint-N`` every ``save_every`` steps; a rerun resumes from the
latest one (weights, optimizer, schedule, RNG, data position). The result is an ordinary HF
sequence-classification checkpoint (one logit) with ``gainrag_training.json``, which
``CrossEncoderSelector`` and FlagEmbedding's ``FlagReranker`` both load.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from gainrag.training.recipe_spec import GroupLoss, TrainArgs

log = logging.getLogger(__name__)


def load_groups(path: Path) -> list[dict[str, Any]]:
    """Groups from a JSONL file; checks the fields every recipe needs."""
    groups = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            g = json.loads(line)
            if not g.get("pos") or not g.get("neg") or not isinstance(g.get("query"), str):
                raise ValueError(f"{path}:{lineno}: a group needs query, pos and neg")
            groups.append(g)
    if not groups:
        raise ValueError(f"{path} has no groups")
    return groups


class GroupDataset(Dataset[dict[str, Any]]):
    """Groups in FlagEmbedding's reranker format, as a map-style dataset."""

    def __init__(self, groups: Sequence[dict[str, Any]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.groups[i]


@dataclass
class GroupCollator:
    """A batch of groups -> the tokenised pairs, positive first in each group."""

    tokenizer: Any
    max_length: int

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        queries: list[str] = []
        texts: list[str] = []
        teacher: list[float] = []
        sizes: list[int] = []
        for g in groups:
            passages = [g["pos"][0], *g["neg"]]
            queries += [g["query"]] * len(passages)
            texts += passages
            sizes.append(len(passages))
            if "pos_scores" in g and "neg_scores" in g:
                teacher += [g["pos_scores"][0], *g["neg_scores"]]
        batch: dict[str, Any] = dict(
            self.tokenizer(
                queries,
                texts,
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        batch["group_sizes"] = sizes
        if len(teacher) == len(texts):  # only when every group has teacher scores
            batch["teacher_scores"] = torch.tensor(teacher)
        return batch


class EpochShuffleSampler(Sampler[int]):
    """A seeded shuffle per epoch (``random.Random(seed + epoch)``): the same order on resume."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


class GroupTrainer(Trainer):
    """``Trainer`` with a recipe's group loss, data order and warmup."""

    def __init__(self, recipe: GroupLoss, warmup_ratio: float, **kwargs: Any) -> None:
        self.recipe = recipe
        self.warmup_ratio = warmup_ratio
        super().__init__(**kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Mean of the recipe's ``group_loss`` over the groups of the batch."""
        sizes: list[int] = inputs.pop("group_sizes")
        teacher: torch.Tensor | None = inputs.pop("teacher_scores", None)
        outputs = model(**inputs)
        scores = outputs.logits.view(-1)
        teachers = teacher.split(sizes) if teacher is not None else [None] * len(sizes)
        losses = [
            self.recipe.group_loss(s, t) for s, t in zip(scores.split(sizes), teachers, strict=True)
        ]
        loss = torch.stack(losses).mean()
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int]:
        # The Trainer's own RandomSampler draws from torch's RNG; this keeps the original
        # loop's per-epoch order (and stays exact across a resume).
        dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
        return EpochShuffleSampler(len(dataset), self.args.seed)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        """Linear warmup over ``int(warmup_ratio * steps)`` steps, then linear decay to 0."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_linear_schedule_with_warmup(
                optimizer or self.optimizer,
                int(self.warmup_ratio * num_training_steps),
                num_training_steps,
            )
        return self.lr_scheduler


class LossBar(ProgressCallback):
    """Trainer's progress bar, with the mean loss of the last 50 steps instead of a log line."""

    def __init__(self, desc: str) -> None:
        super().__init__()
        self.desc = desc

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        super().on_train_begin(args, state, control, **kw)
        if self.training_bar is not None:
            self.training_bar.set_description(self.desc)
            self.training_bar.unit = "step"

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and self.training_bar is not None:
            recent = step_losses(state)[-50:]
            if recent:
                self.training_bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")


class StopAfter(TrainerCallback):
    """Save and stop after ``steps`` optimizer steps of this run (a time-boxed, resumable run)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.start, self.stopped = steps, 0, False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.start = state.global_step  # already restored when resuming

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.global_step - self.start >= self.steps and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.stopped = True


def step_losses(state: TrainerState) -> list[float]:
    """The loss of every optimizer step so far (logged each step; kept across resumes)."""
    return [float(h["loss"]) for h in state.log_history if "loss" in h]


def init_cross_encoder(path: Path) -> PreTrainedModel:
    """A one-logit cross-encoder from a bare encoder or an existing selector checkpoint."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    # fp32 master weights: shipped checkpoints are fp16; Trainer's mixed precision casts on use
    return model.float()


def training_arguments(args: TrainArgs, work: Path, n_groups: int, show_progress: bool) -> Any:
    """``TrainingArguments`` for a recipe's settings."""
    return TrainingArguments(
        output_dir=str(work),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.groups_per_step,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as the original loop
        lr_scheduler_type="linear",
        seed=args.seed,
        fp16=args.precision == "fp16",
        bf16=args.precision == "bf16",
        # Trainer refuses bf16 without a GPU unless told it runs on the CPU (torch's CPU autocast)
        use_cpu=not torch.cuda.is_available(),
        deepspeed=str(args.deepspeed) if args.deepspeed else None,
        save_strategy="steps",
        save_steps=args.save_every,
        save_total_limit=1,  # resume needs only the latest
        logging_strategy="steps",
        logging_steps=1,  # every step's loss, for the metadata and the progress bar
        report_to="none",
        remove_unused_columns=False,  # the collator reads the raw groups
        # a partial last batch is dropped, as before, unless it is the only one
        dataloader_drop_last=n_groups >= args.groups_per_step,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without CUDA only warns
        disable_tqdm=not show_progress,
    )


def train_selector(
    recipe: GroupLoss,
    init: Path,
    groups: Sequence[dict[str, Any]],
    out: Path,
    args: TrainArgs,
    *,
    work_dir: Path | None = None,
    show_progress: bool = True,
    stop_after_steps: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Fine-tune a cross-encoder on ``groups`` with ``recipe``'s loss; writes ``out``; resumable.

    ``stop_after_steps`` ends this run early (checkpoint saved) for time-boxed runs; returns None
    then, else the metadata written to ``out/gainrag_training.json``. ``callbacks`` are extra
    ``TrainerCallback``s (e.g. to watch the loss); ``extra_meta`` is added to the metadata.
    """
    work = work_dir or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(init)
    trainer = GroupTrainer(
        recipe,
        args.warmup_ratio,
        # model_init: the Trainer seeds, then builds the model (a second time in train(), which
        # is what seeds it; ~1 s for a small encoder)
        model_init=lambda *_: init_cross_encoder(init),
        args=training_arguments(args, work, len(groups), show_progress),
        train_dataset=GroupDataset(groups),
        data_collator=GroupCollator(tok, args.max_length),
        processing_class=tok,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show_progress:
        trainer.add_callback(LossBar(f"train selector ({recipe.name})"))
    stopper = StopAfter(stop_after_steps) if stop_after_steps else None
    for cb in [*callbacks, *([stopper] if stopper is not None else [])]:
        trainer.add_callback(cb)
    resume = get_last_checkpoint(str(work))
    if resume is not None:
        log.info("resuming selector training from %s", resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    if stopper is not None and stopper.stopped:
        return None
    losses = step_losses(trainer.state)
    meta = {
        "init": str(init),
        "recipe": recipe.name,
        "groups": len(groups),
        "steps": trainer.state.global_step,
        "config": recipe.config(args),
        **(extra_meta or {}),
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_final(model, tok, out, meta, args.fp16_output)
        shutil.rmtree(work, ignore_errors=True)
    return meta


def save_final(
    model: torch.nn.Module,
    tok: Any,
    out: Path,
    meta: dict[str, Any],
    fp16: bool,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write ``out`` atomically: the model (fp16 if asked), tokenizer, whatever ``extra`` writes
    into the directory (e.g. DRO's generator adapter), then gainrag_training.json (last, so
    ``extra`` can add what it wrote to ``meta``)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    export = model.half() if fp16 else model
    export.save_pretrained(tmp)  # type: ignore[operator]
    tok.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    (tmp / "gainrag_training.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
