"""``gainrag train selector-data``: gain signals -> distillation groups.

Each candidate gets the label v = -log(ppl + 1) (higher is better). A group holds the best
candidate as the positive and ``group_size - 1`` others as negatives, with their labels as
teacher scores, in FlagEmbedding's reranker format:
``{"query", "pos": [text], "neg": [texts], "pos_scores": [v], "neg_scores": [vs]}``.
Texts are the selector's view of a candidate, ``title\\ntext``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gainrag.config import Settings
from gainrag.evaluation.qa_metrics import cover_em
from gainrag.llm import prompts
from gainrag.llm.interface import Generator
from gainrag.training.registry import Job
from gainrag.training.shard_loop import replacing
from gainrag.types import Passage


def gain_label(ppl: float) -> float:
    """v = -log(ppl + 1)."""
    return -math.log(ppl + 1.0)


def make_group(row: dict[str, Any], group_size: int, rng: random.Random) -> dict[str, Any] | None:
    """One training group from one question's gain signals (None if it has < 2 candidates)."""
    cands = [c for c in row["candidates"] if math.isfinite(c["ppl"])]
    if len(cands) < 2:
        return None
    labelled = sorted(
        ((gain_label(c["ppl"]), f"{c['title']}\n{c['text']}") for c in cands),
        key=lambda x: -x[0],
    )
    pos, rest = labelled[0], labelled[1:]
    need = group_size - 1
    # Enough negatives: sample without replacement; too few: with replacement (FlagEmbedding does
    # the same), so every group has the same size.
    negs = rng.sample(rest, need) if len(rest) >= need else rng.choices(rest, k=need)
    return {
        "query": row["question"],
        "pos": [pos[1]],
        "neg": [t for _, t in negs],
        "pos_scores": [pos[0]],
        "neg_scores": [v for v, _ in negs],
    }


def read_rows(path: Path, corpus: Path = Path("data/corpus.jsonl")) -> list[dict[str, Any]]:
    """The rows of a gain-signals file, or of a shard directory (``gain-shards``; texts joined
    from ``corpus``)."""
    if path.is_dir():
        from gainrag.training.signals.gain_shards import expand_rows

        return expand_rows(path, corpus)
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_groups(rows: list[dict[str, Any]], group_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Groups for every question of gain-signals rows."""
    rng = random.Random(seed)
    for row in rows:
        group = make_group(row, group_size, rng)
        if group is not None:
            yield group


def best_candidate(row: dict[str, Any]) -> dict[str, Any] | None:
    """The lowest-PPL candidate (the would-be positive), None if none has a finite PPL."""
    cands = [c for c in row["candidates"] if math.isfinite(c["ppl"])]
    return min(cands, key=lambda c: c["ppl"]) if cands else None


async def reader_verdicts(
    gen: Generator,
    rows: list[dict[str, Any]],
    *,
    max_passage_words: int,
    max_new_tokens: int,
    concurrency: int = 8,
) -> list[dict[str, Any]]:
    """For each row: the reader's answer from its best candidate and whether acc counts it."""
    sem = asyncio.Semaphore(concurrency)

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        best = best_candidate(row)
        if best is None:
            return {"id": row["id"], "best_id": None, "answer": None, "acc": 0.0}
        passage = Passage(best["id"], best["title"], best["text"], best.get("pseudo", False))
        message = prompts.answer_prompt(row["question"], [passage], max_passage_words)
        async with sem:
            raw = await gen.chat(message, max_new_tokens=max_new_tokens)
        answer = prompts.clean_answer(raw)
        return {
            "id": row["id"],
            "best_id": best["id"],
            "best_pseudo": bool(best.get("pseudo", False)),
            "answer": answer,
            "acc": cover_em(answer, row["answers"]),
        }

    return list(await asyncio.gather(*(one(r) for r in rows)))


async def _filter_rows(
    settings: Settings, rows: list[dict[str, Any]], memo: Path | None
) -> list[dict[str, Any]]:
    from gainrag.evaluation.memo import MemoGenerator
    from gainrag.wiring import build_llm

    gen: Generator = await asyncio.to_thread(build_llm, settings)
    if memo is not None:
        gen = MemoGenerator(gen, memo)
    try:
        return await reader_verdicts(
            gen,
            rows,
            max_passage_words=settings.llm.max_passage_words,
            max_new_tokens=settings.llm.max_new_tokens_answer,
        )
    finally:
        await gen.close()


def filter_log_path(out: Path) -> Path:
    """Where the filter's per-question decisions go."""
    return out.with_suffix(out.suffix + ".filter.jsonl")


def write_groups(
    src: Path,
    out: Path,
    *,
    group_size: int = 16,
    seed: int = 0,
    settings: Settings | None = None,
    filter_with_reader: bool = False,
    generation_memo: Path | None = None,
) -> dict[str, int]:
    """Write the groups of ``src`` to ``out`` (JSONL); returns counts (questions, kept, groups).

    With ``filter_with_reader`` (needs ``settings``), only questions whose lowest-PPL candidate
    lets the reader answer correctly are kept; the decisions go to ``filter_log_path(out)``.
    """
    if group_size < 2:
        raise ValueError("group_size must be at least 2 (one positive, one negative)")
    rows = read_rows(
        src, settings.retrieval.corpus if settings is not None else Path("data/corpus.jsonl")
    )
    kept = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    if filter_with_reader:
        if settings is None:
            raise ValueError("filtering needs the settings of the reader")
        verdicts = asyncio.run(_filter_rows(settings, rows, generation_memo))
        log = filter_log_path(out)
        log.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in verdicts))
        kept = [r for r, v in zip(rows, verdicts, strict=True) if v["acc"] > 0]
    n = 0
    with replacing(out) as f:  # a rerun rewrites it whole: never half a file
        for group in iter_groups(kept, group_size, seed):
            f.write(json.dumps(group, ensure_ascii=False) + "\n")
            n += 1
    return {"questions": len(rows), "kept": len(kept), "groups": n}


class SelectorData(Job):
    """``gainrag train selector-data``."""

    name = "selector-data"
    summary = "gain signals -> distillation groups (the distill recipe's input)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input",
            type=Path,
            required=True,
            help="gain-signals JSONL, or a gain-shards directory",
        )
        parser.add_argument("--output", type=Path, required=True, help="groups JSONL")
        parser.add_argument("--group-size", type=int, default=16)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--filter-with-reader",
            action="store_true",
            help="GainRAG's filter: keep a question only if the reader (GAINRAG_LLM__*), given "
            "its lowest-PPL candidate, answers it correctly (acc)",
        )
        parser.add_argument(
            "--generation-memo",
            type=Path,
            help="JSONL memo of the reader's greedy answers (shared with eval runs)",
        )

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        c = write_groups(
            args.input,
            args.output,
            group_size=args.group_size,
            seed=args.seed,
            settings=settings,
            filter_with_reader=args.filter_with_reader,
            generation_memo=args.generation_memo,
        )
        kept = ""
        if args.filter_with_reader:
            kept = f" ({c['kept']} of {c['questions']} questions kept by the reader filter)"
        print(f"selector data: {c['groups']} groups of {args.group_size}{kept} -> {args.output}")


JOB = SelectorData()
