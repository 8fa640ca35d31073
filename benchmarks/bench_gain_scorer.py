"""The gain-signal scorer, old and new side by side on the same questions and model.

- **old**: ``GainScorer.passage_ppls`` one question at a time (each prompt packed with its gold
  answers, 8 sequences a batch): what ``gain-signals`` ran.
- **new**: ``GainScorer.score_questions`` over a whole shard (``gain-shards``): shared prefixes
  (the template head once, a passage retrieved by several questions of the shard once),
  length-sorted batches under a token budget.

The questions are one shard of a ``gain-shards`` manifest (the job's unit, so the passage sharing
is the job's), with the pseudo-passages its shard file holds when it exists. Reported: seconds
and questions/s, tokens and FLOP/s against the bf16 (or the scorer's dtype) matmul peak measured
in the same run, and how far the two paths' PPLs are apart (relative difference, top-1 and
Spearman per question); ``--reference N`` also scores N questions with the old path in float32,
the tolerance both low-precision paths are judged by. FLOPs: 2 x non-embedding parameters per
token through the decoder, plus the LM head at the answer positions (attention's own FLOPs, ~2%
at these lengths, are left out).

    python -m benchmarks.bench_gain_scorer --model qwen2.5-coder-0.5b --shard 0 --reference 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, matmul_peak, table, write_result
from gainrag.config import Settings
from gainrag.training.signals.gain_shards import load_manifest, shard_path
from gainrag.types import PSEUDO_ID, Passage


def ranks(xs: list[float]) -> list[float]:
    """0-based ranks, ties given their mean rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks."""
    return statistics.correlation(ranks(a), ranks(b))


def compare(want: list[list[float]], got: list[list[float]]) -> dict[str, Any]:
    """How far ``got`` PPLs are from ``want`` (per question lists)."""
    rels = [
        abs(g - w) / w
        for ws, gs in zip(want, got, strict=True)
        for w, g in zip(ws, gs, strict=True)
    ]
    top1 = [
        min(range(len(ws)), key=ws.__getitem__) == min(range(len(gs)), key=gs.__getitem__)
        for ws, gs in zip(want, got, strict=True)
    ]
    rhos = [spearman(ws, gs) for ws, gs in zip(want, got, strict=True)]
    return {
        "max_rel_diff": max(rels),
        "median_rel_diff": statistics.median(rels),
        "top1_same": sum(top1) / len(top1),
        "spearman_mean": statistics.fmean(rhos),
        "spearman_min": min(rhos),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dir", type=Path, default=ROOT / "data/train/signals/qwen0.5b-k20")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N questions of the shard")
    p.add_argument("--reference", type=int, default=0, help="questions also scored in float32")
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--name", default="gain_scorer")
    args = p.parse_args()

    import torch

    from gainrag.llm.scoring import PackedReplies
    from gainrag.llm.shared_prefix import plan_prefixes
    from gainrag.llm.transformers_backend import load_teacher_forced_scorer
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.training.gain import GainItem, GainScorer
    from gainrag.training.questions import training_questions
    from gainrag.weights import prepare_llm

    settings = Settings()
    manifest = load_manifest(args.dir)
    if manifest is None:
        raise SystemExit(f"{args.dir} has no manifest: run the gain-shards job first")
    ids = manifest["shards"][args.shard][: args.limit]
    by_id = {
        str(q["id"]): q
        for q in training_questions(
            [ROOT / f for f in manifest["questions"]], manifest["limit"], manifest["seed"]
        )
    }
    qs = [by_id[i] for i in ids]
    pseudo: dict[str, str | None] = {}
    done = shard_path(args.dir, args.shard)
    if done.is_file():
        for line in done.read_text().splitlines():
            row = json.loads(line)
            pseudo[row["id"]] = row["pseudo_passage"]
    r = settings.retrieval
    retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
    hits = retriever.search_many([q["question"] for q in qs], manifest["k"])
    items = [
        GainItem(
            q["question"],
            [h.passage for h in hs]
            + (
                [Passage(PSEUDO_ID, "", pseudo[q["id"]] or "", True)] if pseudo.get(q["id"]) else []
            ),
            q["answers"],
        )
        for q, hs in zip(qs, hits, strict=True)
    ]
    path = prepare_llm(args.model, settings.llm.models_dir)
    tf = load_teacher_forced_scorer(path, dtype=args.dtype)
    scorer = GainScorer(tf, max_passage_words=settings.llm.max_passage_words)
    model: Any = tf._model  # the FLOP count needs the config and parameter count
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    params = sum(x.numel() for x in model.parameters())
    decoder_params = params - embed * (1 if cfg.tie_word_embeddings else 2)

    # the sequences both paths score, for the token and FLOP counts
    seqs: list[Any] = []
    groups: list[Any] = []
    answer_tokens = 0
    for it in items:
        golds = [a for a in (scorer.answer_ids(x) for x in it.answers) if a]
        seqs.append(PackedReplies(scorer.prompt_ids(it.question, None), golds))
        groups.append(None)
        for c in it.passages:
            seqs.append(PackedReplies(scorer.prompt_ids(it.question, c), golds))
            groups.append(("pseudo", c.text) if c.pseudo else ("passage", c.id))
        answer_tokens += (len(it.passages) + 1) * sum(len(a) for a in golds)
    plan = plan_prefixes(seqs, groups)
    useful_tokens = sum(len(s) for s in seqs)
    useful_flop = 2 * decoder_params * useful_tokens + 2 * embed * answer_tokens

    peak = matmul_peak([1024, 2048, 4096], reps=5, dtype=getattr(torch, tf.dtype))

    t = time.perf_counter()
    old = [scorer.passage_ppls(it.question, it.passages, it.answers, 0.5) for it in items]
    old_s = time.perf_counter() - t
    print(f"old: {old_s:.1f} s", flush=True)
    t = time.perf_counter()
    new = scorer.score_questions(items, 0.5, token_budget=args.token_budget)
    new_s = time.perf_counter() - t
    new_ppls = [x.ppls for x in new]

    runs = []
    for name, secs, tokens in (("old", old_s, useful_tokens), ("new", new_s, plan.tokens(seqs))):
        executed = 2 * decoder_params * tokens + 2 * embed * answer_tokens
        runs.append(
            {
                "scorer": name,
                "seconds": round(secs, 2),
                "questions_per_s": len(items) / secs,
                "s_per_question": secs / len(items),
                "tokens_through_model": tokens,
                "useful_gflops": useful_flop / secs / 1e9,
                "executed_gflops": executed / secs / 1e9,
                "useful_over_peak": useful_flop / secs / 1e9 / peak["gflops"],
                "executed_over_peak": executed / secs / 1e9 / peak["gflops"],
            }
        )
    result: dict[str, Any] = {
        "model": args.model,
        "scorer_version": tf.version,
        "dtype": tf.dtype,
        "shard": args.shard,
        "questions": len(items),
        "candidates": sum(len(it.passages) for it in items),
        "sequences": len(seqs),
        "unshared_tokens": useful_tokens,
        "plan": {"root": plan.root, "nodes": len(plan.nodes), "tokens": plan.tokens(seqs)},
        "decoder_params": decoder_params,
        "peak": peak,
        "runs": runs,
        "speedup": old_s / new_s,
        "new_vs_old": compare(old, new_ppls),
    }
    if args.reference:
        n = args.reference
        ref_tf = load_teacher_forced_scorer(path, dtype="float32")
        ref = GainScorer(ref_tf, max_passage_words=settings.llm.max_passage_words)
        want = [ref.passage_ppls(it.question, it.passages, it.answers, 0.5) for it in items[:n]]
        result["reference_float32"] = {
            "questions": n,
            "old_vs_float32": compare(want, old[:n]),
            "new_vs_float32": compare(want, new_ppls[:n]),
        }

    md = [
        f"{args.model} ({tf.dtype}), shard {args.shard} of `{args.dir.relative_to(ROOT)}`: "
        f"{len(items)} questions, {result['candidates']} candidates, {len(seqs)} sequences, "
        f"{useful_tokens} tokens unshared, {plan.tokens(seqs)} through the model with shared "
        f"prefixes (root {plan.root} tokens, {len(plan.nodes)} shared passage prefixes). "
        f"{tf.dtype} matmul peak measured in the same run: {peak['gflops']:.0f} GFLOP/s.",
        "",
        *table(
            ["scorer", "s", "questions/s", "s/question", "tokens", "useful GFLOP/s",
             "useful / peak", "executed / peak"],
            [
                (
                    x["scorer"], x["seconds"], f"{x['questions_per_s']:.3f}",
                    f"{x['s_per_question']:.2f}", x["tokens_through_model"],
                    f"{x['useful_gflops']:.0f}", f"{x['useful_over_peak']:.0%}",
                    f"{x['executed_over_peak']:.0%}",
                )
                for x in runs
            ],
        ),
        "",
        f"new / old speed: **{result['speedup']:.2f}x**. PPLs new vs old: "
        + ", ".join(f"{k} {v:.4g}" for k, v in result["new_vs_old"].items()),
    ]  # fmt: skip
    if "reference_float32" in result:
        ref_r = result["reference_float32"]
        for key in ("old_vs_float32", "new_vs_float32"):
            md.append(
                f"\n{key} ({ref_r['questions']} questions): "
                + ", ".join(f"{k} {v:.4g}" for k, v in ref_r[key].items())
            )
    write_result(
        args.name,
        result,
        notes=[
            "same model object and questions for both paths; model loading excluded",
            "useful FLOPs count every sequence in full (what the old path computes, padding "
            "aside); executed FLOPs count what each path ran",
        ],
        markdown="\n".join(md),
    )


if __name__ == "__main__":
    main()
