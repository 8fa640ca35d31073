"""Cross-encoder selector training: relevance warm start (InfoNCE) and gain distillation (KL).

Both read groups in FlagEmbedding's reranker format, ``{"query", "pos", "neg"[, "pos_scores",
"neg_scores"]}``, score the group's ``1 + len(neg)`` pairs with the cross-encoder and take a
softmax over the group:

* ``infonce``: cross-entropy with the positive as the target (relevance warm start);
* ``kl``: KL(P_teacher || Q_student), P = softmax(teacher scores), Q = softmax(student scores).

A plain torch loop (AdamW, linear warmup and decay) instead of FlagEmbedding's trainer: its
distillation loss adds a hard cross-entropy term to the soft one, which is not GainRAG's KL
objective. The output is an ordinary HF sequence-classification checkpoint (one logit) that
``CrossEncoderSelector`` and FlagEmbedding's ``FlagReranker`` both load. Training checkpoints
every ``save_every`` steps and resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

log = logging.getLogger(__name__)

Loss = Literal["infonce", "kl"]


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: GainRAG's reference recipe)."""

    loss: Loss = "kl"
    lr: float = 6e-5
    epochs: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 512
    groups_per_step: int = 1
    seed: int = 0
    save_every: int = 200
    fp16_output: bool = True  # ship the final weights as fp16 safetensors


def group_loss(scores: torch.Tensor, teacher: torch.Tensor | None, loss: Loss) -> torch.Tensor:
    """Loss of one group: ``scores`` (n,) with the positive first; ``teacher`` (n,) for KL."""
    log_q = torch.log_softmax(scores.float(), dim=-1)
    if loss == "infonce":
        return -log_q[0]
    if teacher is None:
        raise ValueError("KL distillation needs teacher scores (pos_scores / neg_scores)")
    p = torch.softmax(teacher.float(), dim=-1)
    # KL(P || Q) = sum p (log p - log q); xlogy makes 0 * log 0 = 0
    return (torch.xlogy(p, p) - p * log_q).sum()


def load_groups(path: Path) -> list[dict[str, Any]]:
    """Groups from a JSONL file; checks the fields each loss needs."""
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


def _texts_and_teacher(group: dict[str, Any]) -> tuple[list[str], torch.Tensor | None]:
    texts = [group["pos"][0], *group["neg"]]
    if "pos_scores" in group and "neg_scores" in group:
        teacher = torch.tensor([group["pos_scores"][0], *group["neg_scores"]])
        return texts, teacher
    return texts, None


def init_cross_encoder(path: Path) -> tuple[torch.nn.Module, Any]:
    """A one-logit cross-encoder from a bare encoder or an existing selector checkpoint."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return model.float(), tok


def _save_final(
    model: torch.nn.Module, tok: Any, out: Path, meta: dict[str, Any], fp16: bool
) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export = model.half() if fp16 else model
    export.save_pretrained(tmp)  # type: ignore[operator]
    tok.save_pretrained(tmp)
    (tmp / "gainrag_training.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def train_selector(
    init: Path,
    groups: Sequence[dict[str, Any]],
    out: Path,
    cfg: TrainConfig,
    *,
    work_dir: Path | None = None,
    show_progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any] | None:
    """Fine-tune a cross-encoder on ``groups``; writes the checkpoint to ``out``; resumable.

    ``stop_after_steps`` ends this run early (state saved) for time-boxed runs; returns None then.
    """
    work = work_dir or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    resume = work / "state.pt"
    model, tok = init_cross_encoder(init)
    model.train()
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    params = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    steps_per_epoch = max(1, len(groups) // cfg.groups_per_step)
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(optim, int(cfg.warmup_ratio * total), total)
    step, losses = 0, []
    if resume.exists():
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])  # dropout masks continue exactly as without the stop
        log.info("resuming selector training at step %d/%d", step, total)
    started = time.perf_counter()
    ran = 0
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"train selector ({cfg.loss})",
        unit="step",
        disable=not show_progress,
    )
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = list(range(len(groups)))
        random.Random(cfg.seed + epoch).shuffle(order)  # same order after a resume
        start = offset * cfg.groups_per_step
        batch = [groups[i] for i in order[start : start + cfg.groups_per_step]]
        loss = _step_loss(model, tok, batch, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        ran += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        stopping = stop_after_steps is not None and ran >= stop_after_steps and step < total
        if (step % cfg.save_every == 0 and step < total) or stopping:
            state = {
                "model": model.state_dict(),
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "step": step,
                "losses": losses,
                "rng": torch.get_rng_state(),
            }
            torch.save(state, resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)
        if stopping:
            bar.close()
            return None
    bar.close()
    meta = {
        "init": str(init),
        "groups": len(groups),
        "steps": total,
        "config": asdict(cfg),
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    model.eval()
    _save_final(model, tok, out, meta, cfg.fp16_output)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _step_loss(
    model: torch.nn.Module, tok: Any, batch: list[dict[str, Any]], cfg: TrainConfig
) -> torch.Tensor:
    total = torch.zeros(())
    for group in batch:
        texts, teacher = _texts_and_teacher(group)
        enc = tok(
            [group["query"]] * len(texts),
            texts,
            padding=True,
            truncation="only_second",
            max_length=cfg.max_length,
            return_tensors="pt",
        )
        scores = model(**enc).logits.view(-1)
        total = total + group_loss(scores, teacher, cfg.loss)
    return total / len(batch)
