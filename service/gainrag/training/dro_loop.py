"""The DRO loop: E-step (sample selections, weight them by the reader) and M-step, in rounds.

DRO does not fit the group loop of ``trainer.py``: its targets (the samples and their weights)
come from the selector being trained, so each round re-samples with the updated selector. This is
the minimal extra loop; it shares the model loading (``init_cross_encoder``) and the final save
(``save_final``, fp16 + ``gainrag_training.json``) with the Trainer runner. The math is in
``training/dro.py``.

Per round: E-step over all questions (selector in eval mode, no gradient), then one pass
(``epochs``) of AdamW over the questions with the M-step loss, linear warmup and decay over all
rounds, gradient clipping at 1.0. A round's end is a checkpoint (``<out>.work/round-N.pt``:
weights, optimizer, schedule, log); a rerun resumes after the last finished round. After the last
round one more E-step measures the final estimate of log p(answer | question).

:func:`train_dro` is those pieces in order, each a function of a :class:`DroRun` (what the rounds
read and change): :func:`check_dro`, :func:`start_dro` (model, optimisers, schedules),
:func:`resume_dro`, then per round :func:`dro_round` = :func:`sample` (the E-step, :func:`e_step`
under autocast) + :func:`m_step` + :func:`save_round` (the checkpoint), and :func:`finish_dro`
(the final E-step and the save). The ``dro`` recipe's ``train`` hook (``recipes/dro.py``) runs it.

Optional generator update (DRO's joint training, :class:`GeneratorUpdate`): in the same M-step
batches a LoRA adapter on the in-process reader is trained with the weighted NLL of the gold
answer, -sum_s w_s log p(answer | question, z^s), its own AdamW and schedule; the next E-step
samples with the updated selector *and* scores with the updated reader. The adapter is saved in
``<out>/generator-lora/`` (peft format; ``GAINRAG_LLM__LORA_ADAPTER`` serves it).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from gainrag.llm import prompts
from gainrag.llm.lora import LoraAdapter, version_suffix
from gainrag.llm.packed import PackedReplies
from gainrag.llm.scoring import TeacherForcedScorer
from gainrag.training.dro import (
    generator_loss,
    log_evidence,
    merged_weights,
    mstep_loss,
    normalized_weights,
    sample_prefixes,
    weight_variance,
)
from gainrag.training.recipe_spec import TrainArgs
from gainrag.training.trainer import init_cross_encoder, save_final
from gainrag.types import Passage

log = logging.getLogger(__name__)

LOG_MS = (1, 4, 8)  # sample counts whose estimate and weight variance every round logs
GENERATOR_ADAPTER_DIR = "generator-lora"  # inside the selector checkpoint of a joint run


@dataclass(frozen=True)
class DroQuestion:
    """A training question with its gold answers and its retrieved candidates (best first)."""

    question: str
    answers: list[str]
    passages: list[Passage]


@dataclass(frozen=True)
class DroSettings:
    """The E-step's settings."""

    top_n: int = 1  # passages per selection (the serving top_n)
    samples: int = 8  # m: selections per question that train the selector
    temperature: float = 1.0  # of the Plackett-Luce policy over the selector's scores
    rounds: int = 3  # E-step + M-step rounds


class ReaderLikelihood:
    """log p(answer | question, passages) from a teacher-forced reader, with the answer prompt.

    The likelihood of a question's gold answers is the best over its answers (as the gain signal
    takes the minimum perplexity over answers); all answers are packed after one prompt.
    """

    def __init__(self, scorer: TeacherForcedScorer, *, max_passage_words: int | None = 200) -> None:
        self.scorer = scorer
        self.max_passage_words = max_passage_words
        self._golds: dict[tuple[str, ...], list[list[int]]] = {}

    def _gold_ids(self, answers: Sequence[str]) -> list[list[int]]:
        key = tuple(answers)
        if key not in self._golds:
            ids = [self.scorer.reply_ids(a.strip()) for a in dict.fromkeys(answers) if a.strip()]
            if not any(ids):
                raise ValueError(f"no non-empty gold answer in {list(answers)}")
            self._golds[key] = [x for x in ids if x]
        return self._golds[key]

    def _sequences(self, items: Sequence[tuple[DroQuestion, Sequence[int]]]) -> list[PackedReplies]:
        seqs = []
        for q, z in items:
            message = prompts.answer_prompt(
                q.question, [q.passages[i] for i in z], self.max_passage_words
            )
            seqs.append(PackedReplies(self.scorer.prompt_ids(message), self._gold_ids(q.answers)))
        return seqs

    def log_likelihoods(self, items: Sequence[tuple[DroQuestion, Sequence[int]]]) -> list[float]:
        """One log-likelihood per (question, selection), the passages in selection order."""
        seqs = self._sequences(items)
        logits = self.scorer.reply_logits(seqs)
        return [
            float(_best_answer([x.double() for x in xs], seq.replies))
            for seq, xs in zip(seqs, logits, strict=True)
        ]

    def trainable_log_likelihoods(
        self, items: Sequence[tuple[DroQuestion, Sequence[int]]]
    ) -> torch.Tensor:
        """As :meth:`log_likelihoods`, differentiable in the reader's trainable weights."""
        trainable = getattr(self.scorer, "trainable_reply_logits", None)
        if trainable is None:
            raise TypeError(f"{type(self.scorer).__name__} cannot train the reader")
        seqs = self._sequences(items)
        return torch.stack(
            [_best_answer(xs, seq.replies) for seq, xs in zip(seqs, trainable(seqs), strict=True)]
        )


def _best_answer(logits: Sequence[torch.Tensor], replies: Sequence[Sequence[int]]) -> torch.Tensor:
    """max over the gold answers of the summed log-probability of their tokens."""
    per_answer = [
        torch.log_softmax(x, dim=-1).gather(1, torch.as_tensor(ids, device=x.device)[:, None]).sum()
        for x, ids in zip(logits, replies, strict=True)
    ]
    return torch.stack(per_answer).max()


@dataclass
class GeneratorUpdate:
    """DRO's optional generator M-step: a LoRA adapter on the reader (the same model that
    :class:`ReaderLikelihood` scores with), trained with each question's weighted NLL."""

    adapter: LoraAdapter
    lr: float = 1e-4


def selector_scores(
    model: torch.nn.Module, tok: Any, q: DroQuestion, max_length: int, device: torch.device
) -> torch.Tensor:
    """The cross-encoder's (k,) scores of a question's candidates (gradient if enabled)."""
    texts = [p.as_candidate_text() for p in q.passages]
    enc = tok(
        [q.question] * len(texts),
        texts,
        padding=True,
        truncation="only_second",
        max_length=max_length,
        return_tensors="pt",
    ).to(device)
    return model(**enc).logits.view(-1)


@dataclass
class EStep:
    """One question's draws: selections, their log-likelihoods."""

    samples: list[list[int]]
    log_likelihoods: list[float]


def e_step(
    model: torch.nn.Module,
    tok: Any,
    questions: Sequence[DroQuestion],
    reader: ReaderLikelihood,
    cfg: DroSettings,
    *,
    draws: int,
    seed: int,
    max_length: int,
    device: torch.device,
    chunk: int = 8,
    show_progress: bool = True,
    desc: str = "E-step",
) -> list[EStep]:
    """``draws`` selections per question from the current selector, scored by the reader.

    Repeated selections of one question are scored once (with n = 1 and a peaked policy most
    draws repeat). The draws of question i use generator seed (seed, i): reproducible on resume.
    """
    model.eval()
    out: list[EStep] = []
    with tqdm(total=len(questions), desc=desc, unit="q", disable=not show_progress) as bar:
        for start in range(0, len(questions), chunk):
            batch = questions[start : start + chunk]
            drawn = []
            for j, q in enumerate(batch):
                with torch.no_grad():
                    s = selector_scores(model, tok, q, max_length, device)
                g = torch.Generator().manual_seed(seed * 1_000_003 + start + j)
                drawn.append(sample_prefixes(s, cfg.top_n, draws, cfg.temperature, g))
            unique = sorted({(j, tuple(z)) for j, zs in enumerate(drawn) for z in zs})
            lls = reader.log_likelihoods([(batch[j], z) for j, z in unique])
            by_key = dict(zip(unique, lls, strict=True))
            for j, zs in enumerate(drawn):
                out.append(EStep(zs, [by_key[(j, tuple(z))] for z in zs]))
            bar.update(len(batch))
    return out


def round_stats(draws: Sequence[EStep], ms: Sequence[int]) -> dict[str, dict[str, float]]:
    """Mean over questions, for each m: the estimate of log p(a|q) from the first m draws, the
    variance of their normalised weights, and their effective sample size 1 / sum w^2."""
    stats: dict[str, dict[str, float]] = {"log_evidence": {}, "weight_variance": {}, "ess": {}}
    for m in ms:
        ev, var, ess = [], [], []
        for d in draws:
            ll = d.log_likelihoods[:m]
            w = normalized_weights(ll)
            ev.append(log_evidence(ll))
            var.append(weight_variance(w))
            ess.append(float(1.0 / (w**2).sum()))
        stats["log_evidence"][str(m)] = sum(ev) / len(ev)
        stats["weight_variance"][str(m)] = sum(var) / len(var)
        stats["ess"][str(m)] = sum(ess) / len(ess)
    return stats


def _optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    # as the Trainer runner: no weight decay on biases and LayerNorm weights
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )


@dataclass
class DroRun:
    """One DRO run: what every round reads (questions, reader, settings) and what it changes (the
    selector, its AdamW and schedule, the generator update's, the log); a round's checkpoint is
    the changing half, saved (:func:`save_round`)."""

    questions: Sequence[DroQuestion]
    reader: ReaderLikelihood
    args: TrainArgs
    cfg: DroSettings
    work: Path
    device: torch.device
    tok: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: GeneratorUpdate | None = None
    gen_opt: torch.optim.Optimizer | None = None
    gen_sched: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    next_round: int = 0  # the first round this process runs (after a resume: the one after)
    log_ms: Sequence[int] = LOG_MS
    show_progress: bool = True

    @property
    def draws(self) -> int:
        """Selections drawn per question: the M-step's m, or more for the logged estimates."""
        return max(self.cfg.samples, *self.log_ms)

    @property
    def ms(self) -> list[int]:
        """The sample counts each round's statistics are logged for."""
        return sorted({*self.log_ms, self.cfg.samples})

    @property
    def batches_per_round(self) -> int:
        """Forward passes of one M-step (every question once per epoch)."""
        return _batches_per_round(len(self.questions), self.args)

    def autocast(self) -> torch.autocast:
        """bf16 autocast for the selector when asked (``--precision bf16``), else a no-op."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16"
        )


def _batches_per_round(questions: int, args: TrainArgs) -> int:
    return args.epochs * math.ceil(questions / args.groups_per_step)


def check_dro(questions: Sequence[DroQuestion], args: TrainArgs, cfg: DroSettings) -> None:
    """Refuse what the loop cannot run, before any model loads."""
    if args.precision == "fp16" or args.deepspeed is not None:
        raise ValueError("the DRO loop runs fp32 or bf16 autocast, without DeepSpeed")
    if not questions:
        raise ValueError("no training questions")
    if cfg.temperature <= 0 or cfg.samples < 1 or cfg.top_n < 1 or cfg.rounds < 1:
        raise ValueError(f"DRO needs temperature > 0 and samples, top_n, rounds >= 1: {cfg}")


def start_dro(
    init: Path,
    questions: Sequence[DroQuestion],
    reader: ReaderLikelihood,
    args: TrainArgs,
    cfg: DroSettings,
    work: Path,
    *,
    generator: GeneratorUpdate | None = None,
    log_ms: Sequence[int] = LOG_MS,
    show_progress: bool = True,
) -> DroRun:
    """The run before its first round: the selector from ``init`` (seeded first: the head's init
    draws from the global generator), AdamW and a linear schedule over all rounds, and the
    generator update's own AdamW and schedule."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(init)
    model: torch.nn.Module = init_cross_encoder(init)
    model.to(device)
    optimizer = _optimizer(model, args)
    total_steps = cfg.rounds * math.ceil(_batches_per_round(len(questions), args) / args.grad_accum)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    run = DroRun(
        questions=questions,
        reader=reader,
        args=args,
        cfg=cfg,
        work=work,
        device=device,
        tok=tok,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        log_ms=log_ms,
        show_progress=show_progress,
    )
    if generator is not None:
        run.gen_opt = torch.optim.AdamW(
            generator.adapter.parameters(), lr=generator.lr, weight_decay=0
        )
        run.gen_sched = get_linear_schedule_with_warmup(run.gen_opt, warmup, total_steps)
    return run


def _latest_round(work: Path) -> tuple[int, Path] | None:
    found = [(int(p.stem.split("-")[1]), p) for p in work.glob("round-*.pt")]
    return max(found) if found else None


def resume_dro(run: DroRun) -> None:
    """Continue after the last round checkpointed in ``run.work``, if any (a no-op otherwise)."""
    resume = _latest_round(run.work)
    if resume is None:
        return
    state = torch.load(resume[1], map_location=run.device, weights_only=False)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.history, run.next_round = state["history"], resume[0] + 1
    if ("generator" in state) != (run.generator is not None):
        raise ValueError(
            f"{resume[1]} was written by a run {'with' if 'generator' in state else 'without'}"
            " the generator update: rerun with the same options or remove the directory"
        )
    if run.generator is not None:
        assert run.gen_opt is not None
        run.generator.adapter.load_state_dict(state["generator"]["adapter"])
        run.gen_opt.load_state_dict(state["generator"]["optimizer"])
        run.gen_sched.load_state_dict(state["generator"]["scheduler"])
    # the M-step's dropout draws from the global generator: restoring it makes a resumed run
    # train exactly as an uninterrupted one (the E-step seeds its own generators)
    torch.set_rng_state(state["rng"])
    log.info("resuming DRO after round %d from %s", resume[0], resume[1])


def save_round(run: DroRun, r: int) -> None:
    """Checkpoint the end of round ``r`` (``round-r.pt``: written whole, then the older ones
    removed: resume needs only the latest)."""
    state: dict[str, Any] = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "history": run.history,
        "rng": torch.get_rng_state(),
    }
    if run.generator is not None:
        assert run.gen_opt is not None
        state["generator"] = {
            "adapter": run.generator.adapter.state_dict(),
            "optimizer": run.gen_opt.state_dict(),
            "scheduler": run.gen_sched.state_dict(),
        }
    tmp = run.work / f"round-{r}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(run.work / f"round-{r}.pt")
    for old in run.work.glob("round-*.pt"):
        if old.name != f"round-{r}.pt":
            old.unlink()


def sample(run: DroRun, seed: int, desc: str) -> list[EStep]:
    """The run's E-step: :func:`e_step` with the current selector and reader, under autocast."""
    with run.autocast():
        return e_step(
            run.model,
            run.tok,
            run.questions,
            run.reader,
            run.cfg,
            draws=run.draws,
            seed=seed,
            max_length=run.args.max_length,
            device=run.device,
            show_progress=run.show_progress,
            desc=desc,
        )


def m_step(run: DroRun, estep: Sequence[EStep], r: int) -> tuple[list[float], list[float]]:
    """Round ``r``'s M-step: ``epochs`` passes over the questions in a seeded order, the
    weighted Plackett-Luce loss of each question's first m draws (and the generator's weighted
    NLL); the losses of every batch, selector's and generator's."""
    args, cfg = run.args, run.cfg
    run.model.train()
    losses: list[float] = []
    gen_losses: list[float] = []
    batch_no = 0
    for epoch in range(args.epochs):
        order = list(range(len(run.questions)))
        random.Random(args.seed + 1000 * r + epoch).shuffle(order)
        bar = tqdm(
            range(0, len(order), args.groups_per_step),
            desc=f"round {r + 1}/{cfg.rounds} M-step",
            unit="step",
            disable=not run.show_progress,
        )
        for start in bar:
            idx = order[start : start + args.groups_per_step]
            with run.autocast():
                batch_loss = torch.stack(
                    [
                        mstep_loss(
                            selector_scores(
                                run.model, run.tok, run.questions[i], args.max_length, run.device
                            ),
                            estep[i].samples[: cfg.samples],
                            normalized_weights(estep[i].log_likelihoods[: cfg.samples]),
                            cfg.temperature,
                        )
                        for i in idx
                    ]
                ).mean()
            (batch_loss / args.grad_accum).backward()
            losses.append(batch_loss.item())
            if run.generator is not None:
                # outside the selector's autocast: the reader runs in its own dtype
                gen_loss = _generator_batch_loss(run.reader, run.questions, estep, idx, cfg.samples)
                (gen_loss / args.grad_accum).backward()
                gen_losses.append(gen_loss.item())
            batch_no += 1
            if batch_no % args.grad_accum == 0 or batch_no == run.batches_per_round:
                _optimizer_step(run)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return losses, gen_losses


def _optimizer_step(run: DroRun) -> None:
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    if run.generator is not None:
        assert run.gen_opt is not None
        torch.nn.utils.clip_grad_norm_(run.generator.adapter.parameters(), 1.0)
        run.gen_opt.step()
        run.gen_sched.step()
        run.gen_opt.zero_grad()


def dro_round(run: DroRun, r: int) -> dict[str, Any]:
    """Round ``r`` (0-based): E-step with the current selector (seed ``seed + 1000 r``), its
    statistics, the M-step, the record (printed, appended to the log), the checkpoint."""
    t0 = time.perf_counter()
    estep = sample(run, run.args.seed + 1000 * r, f"round {r + 1}/{run.cfg.rounds} E-step")
    stats = round_stats(estep, run.ms)
    losses, gen_losses = m_step(run, estep, r)
    record = {
        "round": r + 1,
        **stats,
        "mstep_loss": sum(losses) / len(losses),
        **({"generator_loss": sum(gen_losses) / len(gen_losses)} if gen_losses else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    run.history.append(record)
    print(_describe(record, run.cfg.samples))
    save_round(run, r)
    return record


def finish_dro(
    run: DroRun, init: Path, out: Path, started: float, extra_meta: dict[str, Any] | None
) -> dict[str, Any]:
    """After the last round: one more E-step (the final estimates), then ``out`` with its
    metadata (and the generator's adapter); the work directory goes."""
    cfg = run.cfg
    final = sample(run, run.args.seed + 1000 * cfg.rounds, "final E-step")
    final_stats = round_stats(final, run.ms)
    print(_describe({"round": "final", **final_stats}, cfg.samples))
    meta = {
        "init": str(init),
        "recipe": "dro",
        "questions": len(run.questions),
        "steps": run.scheduler.state_dict().get("last_epoch", 0),
        "dro": {
            "top_n": cfg.top_n,
            "samples": cfg.samples,
            "temperature": cfg.temperature,
            "rounds": cfg.rounds,
        },
        "rounds": run.history,
        "final": final_stats,
        **(extra_meta or {}),
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    extra: Callable[[Path], None] | None = None
    if run.generator is not None:
        meta["generator_update"] = {
            **run.generator.adapter.describe(),
            "lr": run.generator.lr,
            "loss": "weighted-nll",
            "adapter": GENERATOR_ADAPTER_DIR,
            # a hash of the weights in memory (a resumed run must reach the same one)
            "fingerprint": run.generator.adapter.fingerprint(),
        }
        adapter = run.generator.adapter
        record = meta["generator_update"]

        def extra(directory: Path) -> None:
            adapter.save(directory / GENERATOR_ADAPTER_DIR)
            # the suffix serving appends to the generator's version (a hash of the saved file)
            record["served_version"] = version_suffix(directory / GENERATOR_ADAPTER_DIR)

    save_final(run.model, run.tok, out, meta, run.args.fp16_output, extra=extra)
    shutil.rmtree(run.work, ignore_errors=True)
    return meta


def train_dro(
    init: Path,
    questions: Sequence[DroQuestion],
    reader: ReaderLikelihood,
    out: Path,
    args: TrainArgs,
    cfg: DroSettings,
    *,
    work_dir: Path | None = None,
    show_progress: bool = True,
    log_ms: Sequence[int] = LOG_MS,
    extra_meta: dict[str, Any] | None = None,
    generator: GeneratorUpdate | None = None,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` DRO rounds from ``init``; writes ``out``; returns its metadata.

    ``generator``: also train the reader (a LoRA adapter) in every M-step."""
    check_dro(questions, args, cfg)
    work = work_dir or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    run = start_dro(
        init,
        questions,
        reader,
        args,
        cfg,
        work,
        generator=generator,
        log_ms=log_ms,
        show_progress=show_progress,
    )
    resume_dro(run)
    started = time.perf_counter()
    for r in range(run.next_round, cfg.rounds):
        dro_round(run, r)
    return finish_dro(run, init, out, started, extra_meta)


def _generator_batch_loss(
    reader: ReaderLikelihood,
    questions: Sequence[DroQuestion],
    estep: Sequence[EStep],
    idx: Sequence[int],
    samples: int,
) -> torch.Tensor:
    """The mean over a batch's questions of the weighted NLL of the gold answer under each
    question's distinct samples (weights from the E-step, summed over repeated draws)."""
    losses = []
    for i in idx:
        draws = estep[i]
        merged = merged_weights(
            draws.samples[:samples], normalized_weights(draws.log_likelihoods[:samples])
        )
        lls = reader.trainable_log_likelihoods([(questions[i], z) for z, _ in merged])
        losses.append(generator_loss(lls, [w for _, w in merged]))
    return torch.stack(losses).mean()


def _describe(record: dict[str, Any], m: int) -> str:
    ev = ", ".join(f"m={k}: {v:.4f}" for k, v in record["log_evidence"].items())
    var = ", ".join(f"m={k}: {v:.4g}" for k, v in record["weight_variance"].items())
    loss = f", M-step loss {record['mstep_loss']:.4f}" if "mstep_loss" in record else ""
    if "generator_loss" in record:
        loss += f", generator loss {record['generator_loss']:.4f}"
    return f"dro round {record['round']}: log p(a|q) ~ {ev}; weight variance {var}{loss}"
