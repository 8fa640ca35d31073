"""``gainrag train gain-signals``: label retrieved passages and the pseudo-passage with their gain.

For each training question: retrieve the top-k passages, write the pseudo-passage with the
reader (the generator of the settings, so an OpenAI-compatible llama.cpp/vLLM server or the
in-process model, GainRAG's prompt), and compute every candidate's contrastive PPL of the gold
answers with a teacher-forced scorer on the reader's weights in torch (``--scorer-model``,
default the settings' model; a bundled model's weights are its GGUF de-quantised once by
``gainrag.weights.prepare_llm``). Each row records the pseudo-passage writer, the scorer, its
dtype and where its weights came from. Output is JSONL, one question per line, appended as it
goes; a rerun skips finished ids, so an interrupted job resumes where it stopped (the loop is
``training/shard_loop.py``'s, shared with the other signal jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gainrag.config import Settings
from gainrag.evaluation.qa_metrics import has_answer
from gainrag.llm import prompts
from gainrag.llm.interface import Generator
from gainrag.training.questions import question_args, training_questions
from gainrag.training.registry import Job
from gainrag.training.shard_loop import ShardLoop, row_id
from gainrag.types import PSEUDO_ID, Passage

if TYPE_CHECKING:
    from gainrag.training.gain import GainScorer


def scorer_weights(path: Path) -> dict[str, Any]:
    """Where a scorer checkpoint came from: a bundled GGUF's record (de-quantised), or its path."""
    meta = path / "gainrag_model.json"
    if meta.is_file():
        return {**json.loads(meta.read_text()), "dequantised_from_gguf": True}
    return {"path": str(path), "dequantised_from_gguf": False}


async def pseudo_passages(gen: Generator, questions: list[str], max_new_tokens: int) -> list[str]:
    """One pseudo-passage per question, concurrently (the generator batches them)."""
    return list(
        await asyncio.gather(
            *(gen.chat(prompts.pseudo_prompt(q), max_new_tokens=max_new_tokens) for q in questions)
        )
    )


def synthesize(
    settings: Settings,
    questions: list[dict[str, Any]],
    out: Path,
    *,
    k: int = 20,
    alpha: float = 0.5,
    batch_questions: int = 8,
    show_progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    pseudo_passage: bool = True,
    scorer_model: str | None = None,
    scorer_dtype: str | None = None,
    generation_memo: Path | None = None,
) -> dict[str, Any]:
    """Append gain-labelled candidates for every question not yet in ``out``.

    ``shard=(i, n)`` keeps every n-th question from the i-th: n processes with disjoint shards
    can append to the same output (each line is written under an exclusive file lock).
    ``scorer_model`` / ``scorer_dtype`` default to the settings' LLM model and dtype.
    """
    loop = ShardLoop.over_jsonl(questions, out, row_id, shard=shard)
    stats: dict[str, Any] = {
        "questions": len(loop.items),
        "skipped": loop.skipped,
        "written": 0,
    }
    if not loop.todo:  # nothing to do: load no model
        return stats
    return asyncio.run(
        _synthesize(
            settings,
            loop,
            out,
            stats,
            k=k,
            alpha=alpha,
            batch_questions=batch_questions,
            show_progress=show_progress,
            pseudo_passage=pseudo_passage,
            scorer_model=scorer_model or settings.llm.model,
            scorer_dtype=scorer_dtype or settings.llm.dtype,
            generation_memo=generation_memo,
        )
    )


async def load_gain_models(
    settings: Settings,
    pseudo_passage: bool,
    scorer_model: str,
    scorer_dtype: str,
    generation_memo: Path | None,
) -> tuple[Generator | None, GainScorer, Path]:
    """The pseudo-passage writer (the settings' generator, memoised; None without the
    pseudo-passage), the gain scorer on ``scorer_model``'s weights, and where those are."""
    # Models load here, not at import: the CLI imports every job to build its parser.
    from gainrag.evaluation.memo import MemoGenerator
    from gainrag.llm.transformers_backend import load_teacher_forced_scorer
    from gainrag.training.gain import GainScorer
    from gainrag.weights import prepare_llm
    from gainrag.wiring import build_llm

    gen: Generator | None = None
    if pseudo_passage:
        gen = await asyncio.to_thread(build_llm, settings)
        if generation_memo is not None:
            gen = MemoGenerator(gen, generation_memo)
    path = prepare_llm(scorer_model, settings.llm.models_dir)
    tf = load_teacher_forced_scorer(path, dtype=scorer_dtype)
    return gen, GainScorer(tf, max_passage_words=settings.llm.max_passage_words), path


async def _synthesize(
    settings: Settings,
    loop: ShardLoop[dict[str, Any]],
    out: Path,
    stats: dict[str, Any],
    *,
    k: int,
    alpha: float,
    batch_questions: int,
    show_progress: bool,
    pseudo_passage: bool,
    scorer_model: str,
    scorer_dtype: str,
    generation_memo: Path | None,
) -> dict[str, Any]:
    # Models load here, not at import: the CLI imports every job to build its parser.
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever

    r, llm = settings.retrieval, settings.llm
    retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
    gen, scorer, path = await load_gain_models(
        settings, pseudo_passage, scorer_model, scorer_dtype, generation_memo
    )
    tf: Any = scorer.llm  # the in-process scorer (dtype, version)
    meta = {
        "alpha": alpha,
        "k": k,
        "generator": None if gen is None else gen.version,  # wrote the pseudo-passage
        "scorer": tf.version,
        "scorer_dtype": tf.dtype,
        "scorer_weights": scorer_weights(path),
        "index_version": retriever.version,
        "prompt_version": prompts.PROMPT_VERSION,
    }
    started = time.perf_counter()
    try:
        with loop.appending(out, desc="gain signals", show_progress=show_progress) as sink:
            for _, batch in loop.batches(batch_questions):
                texts = [q["question"] for q in batch]
                retrieved = retriever.search_many(texts, k)
                pseudos = (
                    await pseudo_passages(gen, texts, llm.max_new_tokens_pseudo)
                    if gen is not None
                    else [""] * len(batch)
                )
                for q, hits, pseudo in zip(batch, retrieved, pseudos, strict=True):
                    t0 = time.perf_counter()
                    row = _label(q, hits, pseudo, scorer, alpha, with_pseudo=gen is not None)
                    row.update(meta, score_seconds=round(time.perf_counter() - t0, 2))
                    sink.append(row)  # shards of other processes append here too
        stats["written"] = sink.written
    finally:
        if gen is not None:
            await gen.close()
    stats["seconds"] = round(time.perf_counter() - started, 1)
    stats.update(meta)
    return stats


def _label(
    q: dict[str, Any],
    hits: list[Any],
    pseudo: str,
    scorer: Any,
    alpha: float,
    *,
    with_pseudo: bool,
) -> dict[str, Any]:
    """One output row: the question's candidates with their contrastive PPL and has_answer."""
    cands: list[dict[str, Any]] = [
        {
            "id": h.passage.id,
            "title": h.passage.title,
            "text": h.passage.text,
            "pseudo": False,
            "retrieval_rank": h.rank,
            "retrieval_score": h.score,
        }
        for h in hits
    ]
    if with_pseudo and not prompts.is_not_available(pseudo):
        cands.append(
            {
                "id": PSEUDO_ID,
                "title": "",
                "text": pseudo.strip(),
                "pseudo": True,
                "retrieval_rank": None,
                "retrieval_score": None,
            }
        )
    passages = [Passage(c["id"], c["title"], c["text"], c["pseudo"]) for c in cands]
    ppls = scorer.passage_ppls(q["question"], passages, q["answers"], alpha)
    for c, ppl in zip(cands, ppls, strict=True):
        c["ppl"] = ppl
        c["has_answer"] = has_answer(c["text"], q["answers"])
    return {
        "id": str(q["id"]),
        "question": q["question"],
        "answers": q["answers"],
        "candidates": cands,
    }


def shard_arg(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/2, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    """``--shard I/N``: the resumable jobs split their questions over processes the same way."""
    parser.add_argument(
        "--shard",
        type=shard_arg,
        default=(0, 1),
        metavar="I/N",
        help="process every N-th question from the I-th (0-based), to spread over processes",
    )


def add_gain_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of what a gain signal is computed with, shared by the gain-signal jobs."""
    parser.add_argument("--k", type=int, default=20, help="retrieved candidates per question")
    parser.add_argument("--alpha", type=float, default=0.5, help="contrastive weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pseudo",
        dest="pseudo_passage",
        action="store_false",
        help="retrieved candidates only (no pseudo-passage, no generator)",
    )
    parser.add_argument(
        "--scorer-model",
        help="weights of the PPL scorer: a bundled model or a local HF directory "
        "(default: GAINRAG_LLM__MODEL, the reader)",
    )
    parser.add_argument(
        "--scorer-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the PPL scorer (default: GAINRAG_LLM__DTYPE; auto measures it at "
        "scoring shapes)",
    )
    parser.add_argument(
        "--generation-memo",
        type=Path,
        help="JSONL memo of greedy generations (pseudo-passages), shared with eval runs",
    )


class GainSignals(Job):
    """``gainrag train gain-signals``."""

    name = "gain-signals"
    summary = "label retrieved passages and the pseudo-passage with contrastive PPL (resumable)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        question_args(parser, "JSONL files with question and answers")
        parser.add_argument("--output", type=Path, required=True, help="JSONL to append to")
        parser.add_argument("--batch-questions", type=int, default=8)
        add_gain_arguments(parser)
        add_shard_argument(parser)

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        questions = training_questions(args.questions, args.limit, args.seed)
        stats = synthesize(
            settings,
            questions,
            args.output,
            k=args.k,
            alpha=args.alpha,
            batch_questions=args.batch_questions,
            shard=args.shard,
            pseudo_passage=args.pseudo_passage,
            scorer_model=args.scorer_model,
            scorer_dtype=args.scorer_dtype,
            generation_memo=args.generation_memo,
        )
        per_q = ""
        if stats["written"] and "seconds" in stats:
            per_q = (
                f" in {stats['seconds']} s ({stats['seconds'] / stats['written']:.1f} s/question)"
            )
        print(
            f"gain signals: {stats['written']} written{per_q}, {stats['skipped']} already done "
            f"-> {args.output}"
        )


JOB = GainSignals()
