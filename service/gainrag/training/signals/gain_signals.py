"""``gainrag train gain-signals``: label retrieved passages and the pseudo-passage with their gain.

For each training question: retrieve the top-k passages, write the pseudo-passage with the
generator (GainRAG's prompt), and compute every candidate's contrastive PPL of the gold answers.
Output is JSONL, one question per line, appended as it goes; a rerun skips finished ids, so an
interrupted job resumes where it stopped.
"""

from __future__ import annotations

import argparse
import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from gainrag.config import Settings
from gainrag.evaluation.qa_metrics import has_answer
from gainrag.llm import prompts
from gainrag.training.questions import question_args, training_questions
from gainrag.training.registry import Job
from gainrag.types import PSEUDO_ID, Passage


@contextmanager
def locked(f: IO[str]) -> Iterator[None]:
    """An exclusive lock on an open output file, taken by every shard's reads and writes."""
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def finished_ids(path: Path) -> set[str]:
    """Ids already in an output file; drops a torn last line left by an interrupted write.

    Reads and repairs under the same lock the writers take, in place (same inode), so a shard
    appending from another process neither shows up half-written nor loses later lines.
    """
    if not path.exists():
        return set()
    ids: set[str] = set()
    with path.open("r+", encoding="utf-8") as f, locked(f):
        good: list[str] = []
        torn = False
        for line in f.read().splitlines():
            try:
                row = json.loads(line)
                ids.add(str(row["id"]))
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                torn = True
        if torn:  # rewrite without the broken line so appends start on a clean line
            f.seek(0)
            f.write("".join(line + "\n" for line in good))
            f.truncate()
            f.flush()
    return ids


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
) -> dict[str, int]:
    """Append gain-labelled candidates for every question not yet in ``out``.

    ``shard=(i, n)`` keeps every n-th question from the i-th: n processes with disjoint shards
    can append to the same output (each line is written under an exclusive file lock).
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} is outside 0..{n - 1}")
    questions = questions[i::n]
    done = finished_ids(out)
    todo = [q for q in questions if str(q["id"]) not in done]
    # Models load here, not at import: the CLI imports every job to build its parser.
    from gainrag.llm.transformers_backend import TransformersGenerator
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.training.gain import GainScorer
    from gainrag.weights import prepare_llm

    r, llm = settings.retrieval, settings.llm
    retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
    gen = TransformersGenerator(prepare_llm(llm.model, llm.models_dir), dtype=llm.dtype)
    scorer = GainScorer(gen.teacher_forced_scorer(), max_passage_words=llm.max_passage_words)
    meta = {
        "alpha": alpha,
        "k": k,
        "generator": gen.version,
        "index_version": retriever.version,
        "prompt_version": prompts.PROMPT_VERSION,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with (
        out.open("a", encoding="utf-8") as f,
        tqdm(
            total=len(questions),
            initial=len(questions) - len(todo),
            desc="gain signals",
            unit="q",
            disable=not show_progress,
        ) as bar,
    ):
        for start in range(0, len(todo), batch_questions):
            batch = todo[start : start + batch_questions]
            texts = [q["question"] for q in batch]
            retrieved = retriever.search_many(texts, k)
            pseudos = gen.generate_batch(
                [prompts.pseudo_prompt(t) for t in texts], llm.max_new_tokens_pseudo
            )
            for q, hits, pseudo in zip(batch, retrieved, pseudos, strict=True):
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
                if not prompts.is_not_available(pseudo):
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
                row = {
                    "id": str(q["id"]),
                    "question": q["question"],
                    "answers": q["answers"],
                    "candidates": cands,
                    **meta,
                }
                with locked(f):  # shards of other processes append here too
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()  # a crash loses at most the question being written
                written += 1
                bar.update(1)
    return {"questions": len(questions), "skipped": len(questions) - len(todo), "written": written}


def shard_arg(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/2, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return i, n


class GainSignals(Job):
    """``gainrag train gain-signals``."""

    name = "gain-signals"
    summary = "label retrieved passages and the pseudo-passage with contrastive PPL (resumable)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        question_args(parser, "JSONL files with question and answers")
        parser.add_argument("--output", type=Path, required=True, help="JSONL to append to")
        parser.add_argument("--k", type=int, default=20, help="retrieved candidates per question")
        parser.add_argument("--alpha", type=float, default=0.5, help="contrastive weight")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--batch-questions", type=int, default=8)
        parser.add_argument(
            "--shard",
            type=shard_arg,
            default=(0, 1),
            metavar="I/N",
            help="process every N-th question from the I-th (0-based), to spread over processes",
        )

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
        )
        print(
            f"gain signals: {stats['written']} written, {stats['skipped']} already done "
            f"-> {args.output}"
        )


JOB = GainSignals()
