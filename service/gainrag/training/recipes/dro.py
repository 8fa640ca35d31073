"""``dro``: DRO's selector training, selections as a latent variable (E-step / M-step rounds).

The cross-encoder's scores over a question's top-k retrieved passages define a Plackett-Luce
policy; the E-step samples ``--samples`` top-``--top-n`` selections and weights them by the
reader's likelihood of the gold answer (self-normalised importance weights); the M-step maximises
the weighted log-probability of the samples. Math in ``training/dro.py``, loop in
``training/dro_loop.py`` (DRO re-samples with the updated selector each round, which the group
loop of ``trainer.py`` cannot do): the recipe's ``train`` hook runs it, ``check`` refuses
``--stop-after-steps`` and ``report`` prints the estimates. ``--generator-lora`` also updates the
reader in every M-step (weighted NLL of the gold answer through a LoRA adapter, saved in
``<out>/generator-lora/``).
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
class DroInputs:
    """Training questions, the policy and its sampling, and the warm start."""

    questions: list[Path] = field(metadata={"help": "JSONL files with question and answers"})
    limit: int | None = field(
        default=None, metadata={"help": "questions per file (seeded random sample)"}
    )
    k: int = field(default=20, metadata={"help": "retrieved candidates per question"})
    top_n: int = field(default=1, metadata={"help": "passages per sampled selection (top-n)"})
    samples: int = field(default=8, metadata={"help": "m: selections sampled per question"})
    temperature: float = field(
        default=1.0, metadata={"help": "temperature of the Plackett-Luce policy"}
    )
    rounds: int = field(default=3, metadata={"help": "E-step + M-step rounds"})
    init: Path | None = field(
        default=None,
        metadata={
            "help": "relevance warm-start checkpoint (default: GAINRAG_SELECTOR__RERANK_CHECKPOINT)"
        },
    )
    generator_lora: bool = field(
        default=False,
        metadata={
            "help": "also train the reader: a LoRA adapter, weighted NLL of the gold answer "
            "in every M-step (saved in OUT/generator-lora)"
        },
    )
    generator_lr: float = field(default=1e-4, metadata={"help": "learning rate of the adapter"})
    lora_rank: int = field(default=8, metadata={"help": "rank of the reader's LoRA adapter"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator (alpha / rank)"})
    lora_targets: str = field(
        default="q_proj,v_proj",
        metadata={"help": "comma-separated module names of the reader that get LoRA layers"},
    )


@dataclass(kw_only=True)
class DroArgs(TrainArgs):
    """One M-step pass per round, a smaller step than distillation's (the targets move)."""

    lr: float = 2e-5
    epochs: int = 1


class Dro(Recipe):
    """Importance-weighted Plackett-Luce likelihood, re-sampled every round."""

    name = "dro"
    summary = "DRO: E-step samples selections weighted by the reader, M-step weighted PL, rounds"
    loss = "weighted-plackett-luce"
    train_args = DroArgs
    inputs = DroInputs

    def load_groups(
        self, settings: Settings, inputs: DroInputs, args: TrainArgs
    ) -> tuple[list[dict[str, Any]], str]:
        """Each question with its top-k retrieved passages: ``query``, ``answers``, ``passages``."""
        from gainrag.retrieval.encoder import BiEncoder
        from gainrag.retrieval.local import LocalRetriever
        from gainrag.training.questions import training_questions

        r = settings.retrieval
        retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
        questions = training_questions(inputs.questions, inputs.limit, args.seed)
        groups = []
        for start in range(0, len(questions), 64):
            chunk = questions[start : start + 64]
            hits = retriever.search_many([q["question"] for q in chunk], inputs.k)
            for q, hs in zip(chunk, hits, strict=True):
                if len(hs) >= max(2, inputs.top_n):
                    groups.append(
                        {
                            "query": q["question"],
                            "answers": q["answers"],
                            "passages": [h.passage for h in hs],
                        }
                    )
        return groups, f"dro: {len(groups)} questions, top-{inputs.k} candidates each"

    def resolve_init(self, settings: Settings, inputs: DroInputs) -> Path:
        """``--init``, else the settings' relevance checkpoint; it must exist."""
        init = inputs.init or settings.selector.rerank_checkpoint
        if not (init / "config.json").is_file():
            raise ConfigurationError(f"no warm-start checkpoint at {init} (--init)")
        return init

    def group_loss(self, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """The M-step loss for n = 1 selections: ``teacher`` holds each candidate's summed
        importance weight, and -sum_s w_s log PL(z_s) = -sum_i teacher_i log softmax(scores)_i."""
        if teacher is None:
            raise ValueError("the DRO loss needs the importance weights (teacher)")
        return -(teacher.float() * scores.float().log_softmax(dim=-1)).sum()

    def check(self, inputs: DroInputs, args: TrainArgs, stop_after_steps: int | None) -> None:
        """The rounds are the checkpoints: no ``--stop-after-steps``."""
        if stop_after_steps is not None:
            raise ConfigurationError("dro checkpoints after every round; no --stop-after-steps")

    def train(
        self,
        settings: Settings,
        inputs: DroInputs,
        args: TrainArgs,
        init: Path,
        groups: list[dict[str, Any]],
        out: Path,
        *,
        stop_after_steps: int | None = None,
    ) -> dict[str, Any]:
        """Load the reader (and its LoRA adapter) and run the DRO rounds (``dro_loop.train_dro``:
        per round the E-step, M-step and checkpoint)."""
        import torch

        from gainrag.llm.lora import LoraSpec, targets_from
        from gainrag.llm.transformers_backend import TransformersGenerator
        from gainrag.training.dro_loop import (
            DroQuestion,
            DroSettings,
            GeneratorUpdate,
            ReaderLikelihood,
            train_dro,
        )
        from gainrag.weights import prepare_llm

        llm = settings.llm
        # The likelihoods need the reader's token-level scores: the in-process model of the
        # settings (as gain-signals), whatever backend serves answers.
        gen = TransformersGenerator(prepare_llm(llm.model, llm.models_dir), dtype=llm.dtype)
        reader_version = gen.version
        generator = None
        if inputs.generator_lora:
            spec = LoraSpec(inputs.lora_rank, inputs.lora_alpha, targets_from(inputs.lora_targets))
            torch.manual_seed(args.seed)  # the adapter's initial weights: reproducible runs
            generator = GeneratorUpdate(gen.attach_lora(spec), lr=inputs.generator_lr)
        reader = ReaderLikelihood(
            gen.teacher_forced_scorer(), max_passage_words=llm.max_passage_words
        )
        cfg = DroSettings(
            top_n=inputs.top_n,
            samples=inputs.samples,
            temperature=inputs.temperature,
            rounds=inputs.rounds,
        )
        questions = [DroQuestion(g["query"], g["answers"], g["passages"]) for g in groups]
        return train_dro(
            init,
            questions,
            reader,
            out,
            args,
            cfg,
            extra_meta={
                "config": self.config(args),
                "inputs": self.describe_inputs(inputs),
                "reader": reader_version,  # the base weights the adapter (if any) starts from
            },
            generator=generator,
        )

    def report(self, meta: dict[str, Any], inputs: DroInputs, out: Path) -> str:
        """The log p(a|q) estimate of the first round and the final one; the adapter, if any."""
        first, last = meta["rounds"][0], meta["final"]
        m = str(inputs.samples)
        lines = [
            f"selector checkpoint -> {out} ({len(meta['rounds'])} rounds, log p(a|q) "
            f"m={m}: {first['log_evidence'][m]:.4f} -> {last['log_evidence'][m]:.4f})"
        ]
        if "generator_update" in meta:
            lines.append(f"reader LoRA adapter -> {out / 'generator-lora'}")
        return "\n".join(lines)


RECIPE = Dro()
