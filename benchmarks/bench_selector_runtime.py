"""The selector's runtimes on real dev candidates: torch (float32, bfloat16) and OpenVINO (f32,
bf16), their speed and how well each keeps torch float32's ranking.

Candidates: the retriever's top ``--k`` for questions spread over nq_dev and squad_dev (the
served index and encoder). Each runtime scores every question's candidates in one call, as a
request does (length-sorted batches of the scorer's batch size), after a warm-up; reported:
pairs/s, the fraction of questions whose top-1 is torch float32's, the Spearman correlation
with it (mean and min), the largest logit difference. The variants run one after another on
the same cores; bf16 ones only where the CPU has bf16 instructions.

    python -m benchmarks.bench_selector_runtime                 # 24 questions x 100 candidates
    python -m benchmarks.bench_selector_runtime --per-set 50 --k 50 --name selector_runtime_top50
    python -m benchmarks.bench_selector_runtime --write-probe   # rewrite the runtime check's probe
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from benchmarks.common import ROOT, table, write_result
from gainrag.config import Settings
from gainrag.hardware import cpu_features
from gainrag.selector import openvino_runtime as ovr
from gainrag.selector.cross_encoder import CrossEncoderScorer

DATA = ROOT / "data" / "questions"


def dev_candidates(n_per_set: int, k: int) -> list[tuple[str, list[str]]]:
    """(question, top-k candidate texts) for ``n_per_set`` spaced questions of each dev set."""
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever

    s = Settings()
    retriever = LocalRetriever.from_settings(s.retrieval, BiEncoder.from_settings(s.retrieval))
    out = []
    for name in ("nq_dev", "squad_dev"):
        rows = [json.loads(x) for x in (DATA / f"{name}.jsonl").read_text().splitlines()]
        step = max(1, len(rows) // n_per_set)
        qs = [r["question"] for r in rows[::step][:n_per_set]]
        for q, hits in zip(qs, retriever.search_many(qs, k), strict=True):
            out.append((q, [h.passage.as_candidate_text() for h in hits]))
    return out


def write_probe(max_length: int) -> None:
    """25 + 25 dev questions x their top 32 candidates, with the shipped checkpoint's float32
    logits at ``max_length`` (the check then only runs OpenVINO: ~20 s once per machine)."""
    checkpoint = Settings().selector.checkpoint
    assert checkpoint is not None
    rows = dev_candidates(25, 32)
    ref = CrossEncoderScorer(checkpoint, max_length=max_length, dtype="float32", runtime="torch")
    key = ovr.reference_key(ref.checkpoint_version, max_length)
    with ovr.PROBE.open("w") as f:
        for q, docs in rows:
            fp32 = ref.score_pairs([(q, d) for d in docs])
            f.write(json.dumps({"question": q, "candidates": docs, "fp32": {key: fp32}}) + "\n")
    print(f"wrote {len(rows)} questions ({key}) to {ovr.PROBE}")


def measure(
    scorer: CrossEncoderScorer, probe: list[tuple[str, list[str]]]
) -> tuple[list[list[float]], float]:
    scorer.score_pairs([(probe[0][0], d) for d in probe[0][1][:16]])  # warm-up
    start, out = time.perf_counter(), []
    for q, docs in probe:
        out.append(scorer.score_pairs([(q, d) for d in docs]))
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-set", type=int, default=12, help="questions from each dev set")
    ap.add_argument("--k", type=int, default=100, help="candidates per question")
    ap.add_argument("--max-length", type=int, default=Settings().selector.max_length)
    ap.add_argument("--name", default="selector_runtime_k100", help="result file name")
    ap.add_argument("--write-probe", action="store_true", help=f"write {ovr.PROBE} and exit")
    a = ap.parse_args()
    if a.write_probe:
        write_probe(a.max_length)
        return
    checkpoint = Settings().selector.checkpoint
    assert checkpoint is not None
    probe = dev_candidates(a.per_set, a.k)
    pairs = sum(len(d) for _, d in probe)
    variants = [("torch float32", "float32", "torch"), ("openvino f32", "float32", "openvino")]
    if cpu_features().bf16:
        variants[1:1] = [("torch bfloat16", "bfloat16", "torch")]
        variants.append(("openvino bf16", "bfloat16", "openvino"))
    results: dict[str, Any] = {"questions": len(probe), "pairs": pairs, "variants": {}}
    ref: list[list[float]] = []
    for name, dtype, runtime in variants:
        scorer = CrossEncoderScorer(
            checkpoint, max_length=a.max_length, dtype=dtype, runtime=runtime
        )
        scores, secs = measure(scorer, probe)
        if not ref:
            ref = scores
        rhos = [ovr.spearman(x, y) for x, y in zip(ref, scores, strict=True)]
        top1 = np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(ref, scores, strict=True)])
        diff = max(float(np.abs(np.subtract(x, y)).max()) for x, y in zip(ref, scores, strict=True))
        results["variants"][name] = {
            "pairs_per_s": pairs / secs,
            "top1_kept": float(top1),
            "spearman_mean": float(np.mean(rhos)),
            "spearman_min": float(np.min(rhos)),
            "max_abs_diff": diff,
        }
        print(name, results["variants"][name], flush=True)
    base = results["variants"].get("torch bfloat16") or results["variants"]["torch float32"]
    lines = [
        [
            name,
            f"{v['pairs_per_s']:.0f}",
            f"{v['pairs_per_s'] / base['pairs_per_s']:.2f}x",
            f"{v['top1_kept']:.1%}",
            f"{v['spearman_mean']:.4f} / {v['spearman_min']:.4f}",
            f"{v['max_abs_diff']:.3g}",
        ]
        for name, v in results["variants"].items()
    ]
    served = "torch bfloat16" if "torch bfloat16" in results["variants"] else "torch float32"
    md = "\n".join(
        [
            f"{len(probe)} dev questions (nq_dev + squad_dev) x their top {a.k} retrieved "
            f"passages = {pairs} pairs, max length {a.max_length}; one call per question.",
            "",
            *table(
                [
                    "runtime",
                    "pairs/s",
                    f"vs {served}",
                    "top-1 kept (vs torch fp32)",
                    "Spearman mean / min",
                    "max |logit diff|",
                ],
                lines,
            ),
        ]
    )
    write_result(a.name, results, markdown=md)


if __name__ == "__main__":
    main()
