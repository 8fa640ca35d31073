"""``gainrag train gain-shards``: gain signals at scale, in fixed shards committed as they finish.

The reader's own gain signals take hours on a CPU, longer than one working session, so the job is
built to be continued by anyone, anywhere:

- A **manifest** (``manifest.json`` in the shard directory) fixes, once, which questions make
  each shard: the seeded sample of the question files, retrieved top-k, then grouped greedily so
  that the questions of a shard share retrieved passages (the shared-prefix scorer computes a
  passage seen by several questions of a shard once). Later runs read the manifest, never
  recompute it, so shard i means the same questions everywhere.
- Each **shard** is one small JSONL file, written whole (temp file + rename) when its last
  question is scored: ids, candidate ids, retrieval rank and score, contrastive PPL, plain NLL,
  has_answer, the pseudo-passage text, and the scorer, its dtype, the generator and the model's
  sha256. A run skips the shards that exist, so a killed run loses at most the shard in flight,
  and ``--commit`` commits each shard to git as soon as it is written. The loop over the shards
  (``--shard I/N``, skip the files that exist, publish, progress) is ``training/shard_loop.py``'s.
- ``--shards A-B`` and ``--shard I/N`` pick a subset (the 1.5B subset is the first shards; an
  Indexed Job's pod takes every N-th), and :func:`expand_rows` turns a shard directory back into
  full gain-signals rows (texts joined from the corpus) for ``selector-data``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gainrag.config import Settings
from gainrag.errors import ConfigurationError
from gainrag.evaluation.qa_metrics import has_answer
from gainrag.llm import prompts
from gainrag.training.questions import question_args, training_questions
from gainrag.training.registry import Job
from gainrag.training.shard_loop import ShardLoop, publish
from gainrag.training.signals.gain_signals import (
    add_gain_arguments,
    add_shard_argument,
    load_gain_models,
    pseudo_passages,
    scorer_weights,
)
from gainrag.types import PSEUDO_ID, Passage
from gainrag.util import file_sha256

if TYPE_CHECKING:
    from gainrag.training.gain import GainResult
    from gainrag.types import Retrieved

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def shard_path(directory: Path, index: int) -> Path:
    """The file of shard ``index``."""
    return directory / f"shard-{index:04d}.jsonl"


def cluster_shards(passages: list[list[str]], size: int) -> list[list[int]]:
    """Questions (as their retrieved passage ids) grouped into shards of ``size`` that share
    passages: each shard starts from the first question left (in the given order) and grows by
    the question that shares the most passages with the shard so far (ties: the earlier one)."""
    if size < 1:
        raise ValueError("shard size must be >= 1")
    holders: dict[str, list[int]] = defaultdict(list)
    for q, ids in enumerate(passages):
        for p in set(ids):
            holders[p].append(q)
    left = dict.fromkeys(range(len(passages)))  # ordered set
    shards: list[list[int]] = []
    while left:
        seed = next(iter(left))
        shard, pool = [seed], set(passages[seed])
        del left[seed]
        overlap: dict[int, int] = defaultdict(int)
        for p in pool:
            for q in holders[p]:
                if q in left:
                    overlap[q] += 1
        while len(shard) < size and left:
            live = [(n, -q) for q, n in overlap.items() if q in left]
            nxt = -max(live)[1] if live else next(iter(left))
            shard.append(nxt)
            del left[nxt]
            overlap.pop(nxt, None)
            for p in set(passages[nxt]) - pool:
                pool.add(p)
                for q in holders[p]:
                    if q in left:
                        overlap[q] += 1
        shards.append(shard)
    return shards


def parse_range(text: str) -> tuple[int, int]:
    """``A-B`` (inclusive) or ``A`` -> (A, B)."""
    try:
        a, _, b = text.partition("-")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B or A, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"bad shard range {text!r}")
    return lo, hi


def make_manifest(
    settings: Settings,
    files: list[Path],
    limit: int | None,
    seed: int,
    k: int,
    shard_size: int,
) -> dict[str, Any]:
    """The manifest of a new shard directory (retrieves every question once)."""
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever

    questions = training_questions(files, limit, seed)
    r = settings.retrieval
    retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
    hits = retriever.search_many([q["question"] for q in questions], k)
    groups = cluster_shards([[h.passage.id for h in hs] for hs in hits], shard_size)
    return {
        "questions": [str(p) for p in files],
        "questions_sha256": [file_sha256(p) for p in files],
        "limit": limit,
        "seed": seed,
        "k": k,
        "shard_size": shard_size,
        "index_version": retriever.version,
        "retriever": retriever.name,
        "shards": [[str(questions[i]["id"]) for i in g] for g in groups],
        "candidates": candidate_table(questions, hits),
    }


def candidate_table(questions: list[dict[str, Any]], hits: list[list[Any]]) -> dict[str, Any]:
    """Each question's retrieved ids and scores, fixed in the manifest: a run on another machine
    (another query-encoder dtype) scores exactly these candidates, not its own top-k."""
    return {
        str(q["id"]): [[h.passage.id, round(float(h.score), 6)] for h in hs]
        for q, hs in zip(questions, hits, strict=True)
    }


def fixed_candidates(index: Any, table: list[list[Any]]) -> list[Any]:
    """The manifest's candidates of one question as ``Retrieved`` hits of ``index``."""
    from gainrag.types import Retrieved

    out = []
    for rank, (pid, score) in enumerate(table):
        passage = index.get(pid)
        if passage is None:
            raise ConfigurationError(f"passage {pid} of the manifest is not in the index")
        out.append(Retrieved(passage, rank, float(score)))
    return out


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON with one line per shard and per question's candidates (a diff of it
    stays readable; one value per line would be ~160k lines for 2,000 questions)."""
    lines = []
    for key, value in manifest.items():
        if key == "shards":
            body = ",\n".join(f"  {json.dumps(x)}" for x in value)
            lines.append(f'"shards": [\n{body}\n ]')
        elif key == "candidates":
            body = ",\n".join(f"  {json.dumps(q)}: {json.dumps(c)}" for q, c in value.items())
            lines.append(f'"candidates": {{\n{body}\n }}')
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def load_manifest(directory: Path) -> dict[str, Any] | None:
    """The directory's manifest, None if it has none yet."""
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_manifest(manifest: dict[str, Any], files: list[Path], args: dict[str, Any]) -> None:
    """A directory's manifest must match the run's questions and settings (no silent mix)."""
    want: dict[str, Any] = {"questions": [str(p) for p in files], **args}
    if "questions_sha256" in manifest:  # the same paths with other contents are other questions
        want["questions_sha256"] = [file_sha256(p) for p in files]
    diff = {key: (manifest.get(key), v) for key, v in want.items() if manifest.get(key) != v}
    if diff:
        detail = "; ".join(f"{key}: manifest {a!r}, run {b!r}" for key, (a, b) in diff.items())
        raise ConfigurationError(f"the shard directory was made with other settings ({detail})")


# Row fields that must be equal across a directory's shards: a shard scored with another alpha,
# scorer weights, prompt, index or without the pseudo-passage would label other things. The
# dtype may differ (a machine without bf16 scores in fp32): every row records its own.
SAME_IN_EVERY_SHARD = ("alpha", "k", "model_sha256", "prompt_version", "index_version")


def check_rows(directory: Path, n: int, meta: dict[str, Any]) -> None:
    """The run's row metadata must match the shards already in the directory."""
    for s in range(n):
        path = shard_path(directory, s)
        if not path.is_file():
            continue
        first = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])
        diff = [
            f"{key}: shard {s} {first.get(key)!r}, run {meta.get(key)!r}"
            for key in SAME_IN_EVERY_SHARD
            if first.get(key) != meta.get(key)
        ]
        if (first.get("generator") is None) != (meta.get("generator") is None):
            diff.append("pseudo-passage: the shards and the run differ")
        if diff:
            raise ConfigurationError(
                f"{directory} holds shards scored with other settings ({'; '.join(diff)})"
            )
        return


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def commit_shard(path: Path, message: str, attempts: int = 6) -> bool:
    """``git commit`` this one file (other staged changes stay staged), retried only while
    another git command holds the index lock. Returns whether it committed."""
    cwd = path.parent
    for attempt in range(attempts):
        res = _git(["add", "--", path.name], cwd)
        if res.returncode == 0:
            res = _git(["commit", "-q", "-m", message, "--", path.name], cwd)
        if res.returncode == 0:
            return True
        if "index.lock" not in res.stderr + res.stdout:
            break  # nothing to commit, not a repository, an ignored path: retrying won't help
        time.sleep(2 * (attempt + 1))
    log.warning("could not commit %s: %s", path, (res.stderr or res.stdout).strip())
    return False


def commit_pending(directory: Path) -> int:
    """Commit the manifest and shard files of ``directory`` that git does not have yet (a run
    killed between writing a shard and committing it); returns how many."""
    res = _git(["status", "--porcelain", "--", MANIFEST, "shard-*.jsonl"], directory)
    if res.returncode != 0:
        return 0
    names = sorted(line[3:].rsplit("/", 1)[-1] for line in res.stdout.splitlines() if line)
    done = 0
    for name in names:
        done += commit_shard(directory / name, f"gain shards {directory.name}: {name} (pending)")
    return done


def _row(
    q: dict[str, Any],
    hits: list[Retrieved],
    pseudo: str | None,
    result: GainResult,
    meta: dict[str, Any],
) -> dict[str, Any]:
    cands: list[dict[str, Any]] = [
        {
            "id": h.passage.id,
            "rank": h.rank,
            "score": round(float(h.score), 6),
            "has_answer": has_answer(h.passage.text, q["answers"]),
        }
        for h in hits
    ]
    if pseudo is not None:
        cands.append({"id": PSEUDO_ID, "has_answer": has_answer(pseudo, q["answers"])})
    for c, ppl, nll in zip(cands, result.ppls, result.nlls, strict=True):
        c["ppl"] = round(ppl, 6)
        c["nll"] = round(nll, 6)
    return {
        "id": str(q["id"]),
        "question": q["question"],
        "answers": q["answers"],
        "nll_closed_book": round(result.nll_closed_book, 6),
        "pseudo_passage": pseudo,
        "candidates": cands,
        **meta,
    }


async def _pseudo(gen: Any, questions: list[str], max_new_tokens: int) -> list[str | None]:
    texts = await pseudo_passages(gen, questions, max_new_tokens)
    return [None if prompts.is_not_available(t) else t.strip() for t in texts]


def run_shards(
    settings: Settings,
    directory: Path,
    files: list[Path],
    *,
    limit: int | None,
    seed: int = 0,
    k: int = 20,
    alpha: float = 0.5,
    shard_size: int = 50,
    shard_range: tuple[int, int] | None = None,
    shard: tuple[int, int] = (0, 1),
    pseudo_passage: bool = True,
    scorer_model: str | None = None,
    scorer_dtype: str | None = None,
    generation_memo: Path | None = None,
    token_budget: int = 2048,
    commit: bool = False,
    manifest_from: Path | None = None,
) -> dict[str, Any]:
    """Score every selected shard that has no file yet; returns counts and timings.

    ``manifest_from``: a new directory takes that directory's manifest (the same questions in the
    same shards, e.g. a second model on a subset of the first's shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(directory)
    fixed = {"limit": limit, "seed": seed, "k": k, "shard_size": shard_size}
    if manifest is None and manifest_from is not None:
        manifest = load_manifest(manifest_from)
        if manifest is None:
            raise ConfigurationError(f"{manifest_from} has no {MANIFEST}")
    elif manifest_from is not None:
        log.warning("%s has a manifest already: --manifest-from is not used", directory)
    if manifest is None:
        manifest = make_manifest(settings, files, limit, seed, k, shard_size)
    check_manifest(manifest, files, fixed)
    if not (directory / MANIFEST).is_file():
        publish(directory / MANIFEST, manifest_text(manifest))
    if commit:
        commit_pending(directory)
    n = len(manifest["shards"])
    lo, hi = shard_range or (0, n - 1)
    if lo >= n:
        raise ConfigurationError(f"shard {lo} is past the last shard ({n - 1})")
    # a shard is done when its file exists (written whole, by this run or any other)
    loop = ShardLoop(
        range(lo, min(hi, n - 1) + 1), lambda s: shard_path(directory, s).exists(), shard=shard
    )
    stats: dict[str, Any] = {"shards": len(loop.items), "skipped": loop.skipped}
    stats["written"] = 0
    if loop.todo:
        stats.update(
            asyncio.run(
                _score(
                    settings,
                    directory,
                    manifest,
                    files,
                    loop,
                    alpha=alpha,
                    pseudo_passage=pseudo_passage,
                    scorer_model=scorer_model or settings.llm.model,
                    scorer_dtype=scorer_dtype or settings.llm.dtype,
                    generation_memo=generation_memo,
                    token_budget=token_budget,
                    commit=commit,
                )
            )
        )
    return stats


async def _score(
    settings: Settings,
    directory: Path,
    manifest: dict[str, Any],
    files: list[Path],
    loop: ShardLoop[int],
    *,
    alpha: float,
    pseudo_passage: bool,
    scorer_model: str,
    scorer_dtype: str,
    generation_memo: Path | None,
    token_budget: int,
    commit: bool,
) -> dict[str, Any]:
    # Models load here, not at import: the CLI imports every job to build its parser.
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.training.gain import GainItem

    r, llm = settings.retrieval, settings.llm
    retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
    if retriever.version != manifest["index_version"]:
        raise ConfigurationError(
            f"index {retriever.version} is not the manifest's {manifest['index_version']}: "
            "the shards would label other candidates"
        )
    by_id = {
        str(q["id"]): q for q in training_questions(files, manifest["limit"], manifest["seed"])
    }
    gen, scorer, path = await load_gain_models(
        settings, pseudo_passage, scorer_model, scorer_dtype, generation_memo
    )
    tf: Any = scorer.llm
    weights = scorer_weights(path)
    meta: dict[str, Any] = {
        "alpha": alpha,
        "k": manifest["k"],
        "generator": None if gen is None else gen.version,
        "scorer": tf.version,
        "scorer_dtype": tf.dtype,
        "model_sha256": weights.get("gguf_sha256"),
        "index_version": retriever.version,
        "prompt_version": prompts.PROMPT_VERSION,
    }
    check_rows(directory, len(manifest["shards"]), meta)
    fixed = manifest.get("candidates")  # older manifests: retrieve (same machine, same index)
    done_q = 0
    spent = 0.0
    try:
        # one shard at a time; a shard another process finished meanwhile is not yielded
        for pos, (s,) in loop.batches(1):
            out = shard_path(directory, s)
            t0 = time.perf_counter()
            qs = [by_id[qid] for qid in manifest["shards"][s]]
            texts = [q["question"] for q in qs]
            hits = (
                [fixed_candidates(retriever.index, fixed[str(q["id"])]) for q in qs]
                if fixed is not None
                else retriever.search_many(texts, manifest["k"])
            )
            pseudos: list[str | None] = (
                await _pseudo(gen, texts, llm.max_new_tokens_pseudo)
                if gen is not None
                else [None] * len(qs)
            )
            t1 = time.perf_counter()
            items = [
                GainItem(
                    q["question"],
                    [h.passage for h in hs]
                    + ([] if p is None else [Passage(PSEUDO_ID, "", p, True)]),
                    q["answers"],
                )
                for q, hs, p in zip(qs, hits, pseudos, strict=True)
            ]
            results = await asyncio.to_thread(
                scorer.score_questions, items, alpha, token_budget=token_budget
            )
            t2 = time.perf_counter()
            timing = {"pseudo_seconds": round(t1 - t0, 1), "score_seconds": round(t2 - t1, 1)}
            rows = [
                _row(q, hs, p, res, {**meta, "shard": s})
                for q, hs, p, res in zip(qs, hits, pseudos, results, strict=True)
            ]
            text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
            if not publish(out, text):
                log.warning("shard %d was written by another process meanwhile; kept theirs", s)
                continue
            done_q += len(qs)
            spent += t2 - t0
            print(
                f"shard {s}: {len(qs)} questions in {t2 - t0:.0f} s "
                f"(pseudo {timing['pseudo_seconds']} s, scoring {timing['score_seconds']} s, "
                f"{(t2 - t0) / len(qs):.1f} s/question); {loop.eta(pos, spent, 'shards')}",
                flush=True,
            )
            if commit:
                commit_shard(
                    out,
                    f"gain shards {directory.name}: shard {s} ({len(qs)} questions, "
                    f"{(t2 - t0) / len(qs):.1f} s/question, {meta['scorer']})",
                )
    finally:
        if gen is not None:
            await gen.close()
    return {"written": done_q, "seconds": round(spent, 1), **meta}


def expand_rows(directory: Path, corpus: Path) -> list[dict[str, Any]]:
    """Every shard of ``directory`` (in shard order) as full gain-signals rows: the candidates'
    titles and texts joined from ``corpus``, the pseudo-passage from the row."""
    from gainrag.retrieval.index import iter_corpus

    manifest = load_manifest(directory)
    if manifest is None:
        raise ConfigurationError(f"{directory} has no {MANIFEST}")
    raw: list[dict[str, Any]] = []
    done = 0
    for s in range(len(manifest["shards"])):
        path = shard_path(directory, s)
        if path.is_file():
            done += 1
            raw.extend(json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x)
    if done < len(manifest["shards"]):
        log.warning("%s: %d of %d shards finished", directory, done, len(manifest["shards"]))
    wanted = {c["id"] for row in raw for c in row["candidates"] if c["id"] != PSEUDO_ID}
    texts = {p.id: p for p in iter_corpus(corpus) if p.id in wanted}
    files = manifest["questions"]
    answers = {
        str(q["id"]): q["answers"]
        for q in training_questions([Path(f) for f in files], manifest["limit"], manifest["seed"])
    }
    rows = []
    for row in raw:
        cands = []
        for c in row["candidates"]:
            pseudo = c["id"] == PSEUDO_ID
            p = None if pseudo else texts[c["id"]]
            cands.append(
                {
                    **c,
                    "title": "" if p is None else p.title,
                    "text": row["pseudo_passage"] if p is None else p.text,
                    "pseudo": pseudo,
                    "retrieval_rank": c.get("rank"),
                    "retrieval_score": c.get("score"),
                }
            )
        # rows record the answers they were scored with (rows of the first shards of the 0.5B
        # run do not: theirs are the question files')
        rows.append(
            {**row, "answers": row.get("answers") or answers[row["id"]], "candidates": cands}
        )
    return rows


class GainShards(Job):
    """``gainrag train gain-shards``."""

    name = "gain-shards"
    summary = (
        "gain signals in fixed shards, shared-prefix scoring, each shard committed (resumable)"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        question_args(parser, "JSONL files with question and answers")
        parser.add_argument("--dir", type=Path, required=True, help="shard directory")
        add_gain_arguments(parser)
        parser.add_argument("--shard-size", type=int, default=50, help="questions per shard")
        parser.add_argument("--shards", type=parse_range, help="only shards A-B (inclusive)")
        parser.add_argument(
            "--token-budget", type=int, default=2048, help="rows x width of one forward pass"
        )
        parser.add_argument(
            "--commit", action="store_true", help="git-commit each shard as it is written"
        )
        parser.add_argument(
            "--manifest-from",
            type=Path,
            help="a new --dir takes this shard directory's manifest (same shards)",
        )
        add_shard_argument(parser)

    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        stats = run_shards(
            settings,
            args.dir,
            args.questions,
            limit=args.limit,
            seed=args.seed,
            k=args.k,
            alpha=args.alpha,
            shard_size=args.shard_size,
            shard_range=args.shards,
            shard=args.shard,
            pseudo_passage=args.pseudo_passage,
            scorer_model=args.scorer_model,
            scorer_dtype=args.scorer_dtype,
            generation_memo=args.generation_memo,
            token_budget=args.token_budget,
            commit=args.commit,
            manifest_from=args.manifest_from,
        )
        print(
            f"gain shards: {stats['written']} questions written, {stats['skipped']} of "
            f"{stats['shards']} shards already done -> {args.dir}"
        )


JOB = GainShards()
