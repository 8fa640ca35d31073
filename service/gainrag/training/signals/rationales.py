"""``gainrag train rationales``: RADIO's signal, an LLM-written rationale for the gold answer.

For each training question: retrieve the top-k passages, ask the configured generator (any
``Generator``: in-process or an OpenAI-compatible server) why the gold answer is correct (RADIO's
prompt, ``training/radio.py``), embed "question answer rationale" with the project's bi-encoder
and store each passage's dot product with it (``rationale_score``) beside its retrieval score.
The ``radio`` recipe mixes the two with its ``--alpha`` (so the ablation needs no new job).
Output is JSONL appended as it goes; resumable and shardable like ``gain-signals`` (the same
loop, ``training/shard_loop.py``).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gainrag.config import Settings
from gainrag.training.questions import question_args, training_questions
from gainrag.training.radio import rationale_prompt, rationale_query
from gainrag.training.registry import Job
from gainrag.training.shard_loop import ShardLoop, row_id
from gainrag.training.signals.gain_signals import add_shard_argument
from gainrag.types import Retrieved

if TYPE_CHECKING:
    from gainrag.retrieval.local import LocalRetriever


def _passage_vectors(retriever: LocalRetriever, hits: list[Retrieved]) -> np.ndarray:
    """The passages' embeddings: the index's own vectors, else encoded again with the
    retriever's encoder (the same vectors, at a cost)."""
    stored = retriever.index.vectors_of([h.passage.id for h in hits])
    if stored is not None:
        return stored
    return retriever.encoder.encode([h.passage.as_candidate_text() for h in hits])


async def _write(
    settings: Settings,
    loop: ShardLoop[dict[str, Any]],
    out: Path,
    *,
    k: int,
    max_new_tokens: int,
    batch_questions: int,
    show_progress: bool,
) -> int:
    # Models load here, not at import: the CLI imports every job to build its parser.
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.wiring import build_llm

    r = settings.retrieval
    # fp32 query vectors: the stored scores must not depend on the machine's dtype choice
    encoder = BiEncoder.from_settings(r, dtype="float32")
    retriever = LocalRetriever.from_settings(r, encoder)
    gen = build_llm(settings)
    meta = {
        "k": k,
        "generator": gen.version,
        "encoder": encoder.version,
        "index": retriever.version,
    }
    try:
        with loop.appending(out, desc="rationales", show_progress=show_progress) as sink:
            for _, batch in loop.batches(batch_questions):
                hits = retriever.search_many([q["question"] for q in batch], k)
                answers = [q["answers"][0].strip() for q in batch]
                # concurrent calls: the in-process backend batches them, a server serves them
                rationales = await asyncio.gather(
                    *(
                        gen.chat(rationale_prompt(q["question"], a), max_new_tokens=max_new_tokens)
                        for q, a in zip(batch, answers, strict=True)
                    )
                )
                queries = encoder.encode(
                    [
                        rationale_query(q["question"], a, text.strip())
                        for q, a, text in zip(batch, answers, rationales, strict=True)
                    ]
                )
                for q, a, text, qv, hs in zip(
                    batch, answers, rationales, queries, hits, strict=True
                ):
                    sims = _passage_vectors(retriever, hs) @ qv  # unit vectors: the cosine
                    row = {
                        "id": str(q["id"]),
                        "question": q["question"],
                        "answers": q["answers"],
                        "answer": a,
                        "rationale": text.strip(),
                        "candidates": [
                            {
                                "id": h.passage.id,
                                "title": h.passage.title,
                                "text": h.passage.text,
                                "retrieval_rank": h.rank,
                                "retrieval_score": h.score,
                                "rationale_score": float(s),
                            }
                            for h, s in zip(hs, sims, strict=True)
                        ],
                        **meta,
                    }
                    sink.append(row)  # shards of other processes append here too
        return sink.written
    finally:
        await gen.close()
        await retriever.close()


def synthesize(
    settings: Settings,
    questions: list[dict[str, Any]],
    out: Path,
    *,
    k: int = 20,
    max_new_tokens: int = 128,
    batch_questions: int = 8,
    show_progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, int]:
    """Append a rationale row for every question of shard ``shard`` not yet in ``out``."""
    loop = ShardLoop.over_jsonl(questions, out, row_id, shard=shard)
    # unlike gain-signals, the models start even when nothing is left (kept as it was)
    written = asyncio.run(
        _write(
            settings,
            loop,
            out,
            k=k,
            max_new_tokens=max_new_tokens,
            batch_questions=batch_questions,
            show_progress=show_progress,
        )
    )
    return {"questions": len(loop.items), "skipped": loop.skipped, "written": written}


class Rationales(Job):
    """``gainrag train rationales``."""

    name = "rationales"
    summary = "RADIO: rationales of the gold answers, rationale + retrieval scores (resumable)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        question_args(parser, "JSONL files with question and answers")
        parser.add_argument("--output", type=Path, required=True, help="JSONL to append to")
        parser.add_argument("--k", type=int, default=20, help="retrieved passages per question")
        parser.add_argument(
            "--max-new-tokens", type=int, default=128, help="rationale length budget"
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--batch-questions", type=int, default=8)
        add_shard_argument(parser)

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        questions = training_questions(args.questions, args.limit, args.seed)
        stats = synthesize(
            settings,
            questions,
            args.output,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            batch_questions=args.batch_questions,
            shard=args.shard,
        )
        print(
            f"rationales: {stats['written']} written, {stats['skipped']} already done "
            f"-> {args.output}"
        )


JOB = Rationales()
