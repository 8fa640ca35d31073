"""The bundled LLMs as readers: acc / EM / F1 of the ``retrieval`` preset (the retriever's top-1
passage to the reader) on the first N questions of each dev set.

Each model runs in the managed llama.cpp engine (``GAINRAG_LLM__BACKEND=llamacpp``) on its
bundled GGUF, greedy, the engine the embedded default serves with. Reports are written per
(model, dataset) to ``benchmarks/results/readers/`` (``<model>__<set>.json`` and its records in
``<model>__<set>.questions.jsonl.gz``) and an existing report is reused (the run resumes at that
granularity); ``--force`` recomputes. The summary
(``benchmarks/results/readers.{json,md}``) is rebuilt from the reports every time.

    python -m benchmarks.bench_readers [--limit 300] [--models a,b] [--datasets nq_dev,squad_dev]
                                       [--concurrency 4] [--force]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from typing import Any

from benchmarks.common import RESULTS, ROOT, table, write_result
from gainrag.config import Settings
from gainrag.evaluation import qa_metrics
from gainrag.evaluation.harness import run_eval
from gainrag.evaluation.report import load_report, write_report
from gainrag.weights import BUNDLED_LLMS

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DATASETS = ("nq_dev", "squad_dev")
OUT = RESULTS / "readers"


def restates_question(record: dict[str, Any]) -> bool:
    """The reader echoed the question instead of answering (SmolLM2's failure mode)."""
    q = qa_metrics.normalize_answer(record["question"])
    p = qa_metrics.normalize_answer(record["prediction"])
    return bool(p) and (p == q or (len(p) > 12 and p in q))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one report (acc recomputed from the records with the project's metric)."""
    recs = report["records"]
    acc = [qa_metrics.cover_em(r["prediction"], r["answers"]) for r in recs]
    words = [len(r["prediction"].split()) for r in recs]
    return {
        "n": len(recs),
        "errors": len(report.get("errors", [])),
        "acc": statistics.fmean(acc),
        "em": report["em"],
        "f1": report["f1"],
        "selected_has_answer": report.get("selected_has_answer"),
        "restates_question": statistics.fmean(float(restates_question(r)) for r in recs),
        "answer_words_median": statistics.median(words),
        "generate_ms_p50": statistics.median(r["timings_ms"]["generate"] for r in recs),
        "wall_seconds": report["wall_seconds"],
    }


async def evaluate(model: str, dataset: str, limit: int, concurrency: int) -> dict[str, Any]:
    """One eval report with ``model`` in the managed llama.cpp engine."""
    os.environ.update(GAINRAG_LLM__BACKEND="llamacpp", GAINRAG_LLM__MODEL=model)
    settings = Settings()
    questions = ROOT / "data" / "questions" / f"{dataset}.jsonl"
    return await run_eval(settings, questions, "retrieval", limit=limit, concurrency=concurrency)


def main() -> None:
    """Run the missing reports, then write the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--concurrency", type=int, default=4, help="questions in flight")
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    models, datasets = a.models.split(","), a.datasets.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    for model in models:
        if model not in BUNDLED_LLMS:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(BUNDLED_LLMS)}")
        for d in datasets:
            path = OUT / f"{model}__{d}.json"
            if path.exists() and not a.force:
                continue
            report = asyncio.run(evaluate(model, d, a.limit, a.concurrency))
            write_report(path, report)
            print(model, d, json.dumps(summarize(report)))
    rows, results = [], {}
    for model in MODELS:
        for d in DATASETS:
            path = OUT / f"{model}__{d}.json"
            if not path.exists():
                continue
            s = summarize(load_report(path))
            results[f"{model}/{d}"] = s
            rows.append(
                [model, d, s["n"], f"{100 * s['acc']:.1f}", f"{100 * s['em']:.1f}",
                 f"{100 * s['f1']:.1f}", f"{100 * s['restates_question']:.1f}",
                 s["answer_words_median"], f"{s['generate_ms_p50']:.0f}"]
            )  # fmt: skip
    md = "\n".join(
        table(
            [
                "reader",
                "dev set",
                "n",
                "acc",
                "EM",
                "F1",
                "restates question %",
                "answer words (median)",
                "generate p50 ms",
            ],
            rows,
        )
    )
    write_result(
        "readers",
        results,
        notes=[
            "preset retrieval (retriever top-1 to the reader), greedy, the bundled GGUF in "
            "llama.cpp; generate ms measured at eval concurrency 4 (the engine's parallel "
            "slots) on a shared machine; bench_answer measures /answer latency",
        ],
        markdown=md,
    )


if __name__ == "__main__":
    main()
