"""``gainrag eval``: run a preset of the pipeline over a question file and score it."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gainrag.config import Settings
from gainrag.errors import ConfigurationError, GainRAGError
from gainrag.evaluation.machine import machine_info
from gainrag.evaluation.memo import MemoGenerator
from gainrag.evaluation.qa_metrics import (
    cover_em,
    exact_match,
    f1_score,
    has_answer,
    percentile,
    recall_at,
    record_acc,
)
from gainrag.evaluation.questions import load_questions
from gainrag.pipeline import Pipeline
from gainrag.wiring import build_components

RECALL_KS = (1, 5, 20, 100)


@dataclass(frozen=True)
class Preset:
    """A named pipeline configuration."""

    name: str
    description: str
    retrieve: bool
    pseudo_passage: bool
    select: bool
    # a selector setting naming the checkpoint to use instead of the configured selector
    # (``rerank_checkpoint``: the relevance warm start; ``radio_checkpoint``, ``dro_checkpoint``)
    checkpoint_setting: str | None = None


PRESETS = {
    p.name: p
    for p in (
        Preset("closed-book", "no passage: the LLM answers alone", False, False, False),
        Preset("retrieval", "retriever's top-n, no pseudo-passage", True, False, False),
        Preset(
            "rerank",
            "relevance warm-start cross-encoder over retrieved passages",
            True,
            False,
            True,
            checkpoint_setting="rerank_checkpoint",
        ),
        Preset("gainrag", "configured selector over retrieved + pseudo-passage", True, True, True),
        Preset("gainrag-no-pseudo", "configured selector, no pseudo-passage", True, False, True),
        Preset(
            "radio",
            "RADIO-trained cross-encoder over retrieved passages",
            True,
            False,
            True,
            checkpoint_setting="radio_checkpoint",
        ),
        Preset(
            "radio-pseudo",
            "RADIO-trained cross-encoder over retrieved + pseudo-passage",
            True,
            True,
            True,
            checkpoint_setting="radio_checkpoint",
        ),
        Preset(
            "dro",
            "DRO-trained cross-encoder over retrieved passages",
            True,
            False,
            True,
            checkpoint_setting="dro_checkpoint",
        ),
        Preset(
            "dro-pseudo",
            "DRO-trained cross-encoder over retrieved + pseudo-passage",
            True,
            True,
            True,
            checkpoint_setting="dro_checkpoint",
        ),
    )
}


def apply_preset(settings: Settings, preset: Preset) -> Settings:
    """A copy of ``settings`` with the preset's pipeline switches."""
    pipeline = settings.pipeline.model_copy(
        update={
            "retrieve": preset.retrieve,
            "pseudo_passage": preset.pseudo_passage,
            "select": preset.select,
        }
    )
    selector = settings.selector
    if preset.checkpoint_setting is not None:
        checkpoint = getattr(selector, preset.checkpoint_setting)
        selector = selector.model_copy(update={"kind": "cross-encoder", "checkpoint": checkpoint})
    return settings.model_copy(update={"pipeline": pipeline, "selector": selector})


async def _run_one(
    pipeline: Pipeline, row: dict[str, Any], top_n: int | None, k: int
) -> dict[str, Any]:
    result = await pipeline.answer(row["question"], top_n=top_n)
    ks = [x for x in RECALL_KS if x <= k]  # recall@100 of a top-20 list would just repeat @20
    answers = row["answers"]
    record: dict[str, Any] = {
        "id": row["id"],
        "question": row["question"],
        "answers": answers,
        "prediction": result.answer,
        "em": exact_match(result.answer, answers),
        "acc": cover_em(result.answer, answers),
        "f1": f1_score(result.answer, answers),
        "selected_ids": [s.passage.id for s in result.selected],
        "selected_ranks": [s.retrieval_rank for s in result.selected],
        "pseudo_selected": any(s.passage.pseudo for s in result.selected),
        "pseudo_kept": any(c.passage.pseudo for c in result.candidates),
        "timings_ms": result.timings_ms,
    }
    if result.retrieved:
        hits = [has_answer(r.passage.text, answers) for r in result.retrieved]
        record["recall"] = recall_at(hits, ks)
        record["selected_has_answer"] = any(
            has_answer(s.passage.text, answers) for s in result.selected
        )
        # the answer string somewhere in the retrieved list, even if not selected: the error
        # analysis tells "no passage had it" from "the selector missed it"
        record["retrieved_has_answer"] = any(hits)
        gold = set(row.get("gold_ids") or [])
        if gold:
            ids = [r.passage.id for r in result.retrieved]
            record["gold_recall"] = {x: float(bool(gold & set(ids[:x]))) for x in ks}
            record["selected_is_gold"] = any(s.passage.id in gold for s in result.selected)
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-question records into the report's metrics."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean
    totals = [r["timings_ms"]["total"] for r in records]
    out: dict[str, Any] = {
        "n": n,
        "em": mean(r["em"] for r in records),
        "acc": mean(record_acc(r) for r in records),
        "f1": mean(r["f1"] for r in records),
        "pseudo_selected_rate": mean(float(r["pseudo_selected"]) for r in records),
        "pseudo_kept_rate": mean(float(r["pseudo_kept"]) for r in records),
        "latency_ms": {"p50": percentile(totals, 50), "p95": percentile(totals, 95)},
    }
    with_ret = [r for r in records if "recall" in r]
    if with_ret:
        ks = [k for k in RECALL_KS if all(k in r["recall"] for r in with_ret)]
        out["recall"] = {f"@{k}": mean(r["recall"][k] for r in with_ret) for k in ks}
        out["selected_has_answer"] = mean(float(r["selected_has_answer"]) for r in with_ret)
    with_gold = [r for r in records if "gold_recall" in r]
    if with_gold:
        gks = [k for k in RECALL_KS if all(k in r["gold_recall"] for r in with_gold)]
        out["gold_recall"] = {f"@{k}": mean(r["gold_recall"][k] for r in with_gold) for k in gks}
    return out


async def run_eval(
    settings: Settings,
    questions: Path,
    preset_name: str,
    *,
    limit: int | None = None,
    concurrency: int = 8,
    top_n: int | None = None,
    show_progress: bool = True,
    generation_memo: Path | None = None,
) -> dict[str, Any]:
    """Evaluate one preset; returns the report (summary, settings and per-question records).

    ``generation_memo``: a JSONL memo of greedy generations shared by runs (see ``memo.py``).
    """
    if preset_name not in PRESETS:
        raise ConfigurationError(
            f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}"
        )
    preset = PRESETS[preset_name]
    settings = apply_preset(settings, preset)
    rows = load_questions(questions, limit)
    components = await asyncio.to_thread(build_components, settings)
    memo = None
    if generation_memo is not None:
        memo = MemoGenerator(components.generator, generation_memo)
        components.generator = memo
    pipeline = Pipeline(settings, components)
    # Concurrent questions let the generator batch prompts: same answers, ~2.5x the throughput.
    sem = asyncio.Semaphore(concurrency)
    if not rows:
        raise ConfigurationError(f"{questions} has no questions")
    records: list[dict[str, Any] | None] = [None] * len(rows)
    errors: list[dict[str, str]] = []
    started = time.perf_counter()
    try:
        with tqdm(
            total=len(rows), desc=f"eval {preset_name}", unit="q", disable=not show_progress
        ) as bar:

            async def one(i: int) -> None:
                async with sem:
                    try:
                        records[i] = await _run_one(pipeline, rows[i], top_n, settings.retrieval.k)
                    except GainRAGError as exc:  # one bad question must not sink the run
                        errors.append(
                            {"id": rows[i]["id"], "code": exc.code, "message": exc.message}
                        )
                bar.update(1)

            await asyncio.gather(*(one(i) for i in range(len(rows))))
    finally:
        await components.close()
    done = [r for r in records if r is not None]
    summary = summarize(done)
    return {
        "preset": preset_name,
        "description": preset.description,
        "questions": str(questions),
        "limit": limit,
        "concurrency": concurrency,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "models": pipeline.models,
        "settings": {
            "k": settings.retrieval.k,
            "top_n": top_n or settings.pipeline.top_n,
            "llm": settings.llm.model,
            "retrieval_weight": settings.pipeline.retrieval_weight,
            "select_top": settings.pipeline.select_top,
            "selector_max_length": settings.selector.max_length,
            "retrieval_mode": _retrieval_mode(settings),
        },
        "machine": machine_info(),
        "generation_memo": None
        if memo is None
        else {"path": str(generation_memo), "hits": memo.hits, "misses": memo.misses},
        **summary,
        "errors": errors,
        "records": done,
    }


def format_table(reports: list[dict[str, Any]]) -> str:
    """A markdown table of the main metrics of several reports."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x:.0f}"

    lines = [
        "| preset | n | errors | acc | EM | F1 | R@1 | R@5 | R@20 | R@100 | sel. has answer "
        "| pseudo sel. | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        k_run = (r.get("settings") or {}).get("k", max(RECALL_KS))
        rec = {key: v for key, v in (r.get("recall") or {}).items() if int(key[1:]) <= k_run}
        lat = r.get("latency_ms") or {}
        acc = r.get("acc")
        if acc is None and r.get("records"):  # a report from before the metric existed
            acc = statistics.fmean(record_acc(x) for x in r["records"])
        cells = [
            r["preset"],
            r["n"],
            len(r.get("errors", [])),
            pct(acc),
            pct(r.get("em")),
            pct(r.get("f1")),
            *(pct(rec.get(f"@{k}")) for k in RECALL_KS),
            pct(r.get("selected_has_answer")),
            pct(r.get("pseudo_selected_rate")),
            ms(lat.get("p50")),
            ms(lat.get("p95")),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _retrieval_mode(settings: Settings) -> str:
    """``dense``, or the hybrid fusion and its parameters (what ranks the k candidates)."""
    r = settings.retrieval
    if r.mode == "dense":
        return "dense"
    part = f"c={r.rrf_c}" if r.fusion == "rrf" else f"w={r.lexical_weight:g}"
    score = ", dense score" if r.hybrid_score == "dense" else ""
    return f"hybrid {r.fusion} {part} depth={r.fusion_depth}{score}"
