"""Seconds per question of ``gainrag train gain-signals`` with the default reader's set-up.

For each model: its GGUF behind llama.cpp's OpenAI-compatible server writes the pseudo-passage
(through the settings, as the job runs in production), and the teacher-forced scorer on the same
model's de-quantised weights in torch computes the contrastive PPL of every candidate (k retrieved
+ the pseudo-passage). Model loading is excluded; each question's scoring time is in its row.

    python -m benchmarks.bench_gain_signals --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b \
        --per-file 1 --k 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import LOG_DIR, ROOT, table, write_result
from gainrag.config import Settings
from gainrag.training.questions import training_questions
from gainrag.training.signals.gain_signals import synthesize
from gainrag.weights import BUNDLED_LLMS, package_dir
from gainrag_harness import llama_service

TRAIN = [
    ROOT / "data" / "questions" / "nq_train.jsonl",
    ROOT / "data" / "questions" / "squad_train.jsonl",
]


def gguf_of(name: str, models_dir: Path) -> Path:
    """The model's GGUF: the package file of a one-part model, else the assembled copy."""
    spec = BUNDLED_LLMS[name]
    if len(spec.parts) == 1:
        pkg, rel_path = spec.parts[0]
        return package_dir(pkg) / rel_path
    return models_dir.expanduser() / "gguf" / spec.gguf_name


def measure(name: str, questions: list[dict[str, Any]], k: int, threads: int) -> dict[str, Any]:
    """One model: the job over ``questions`` into a scratch file; per-question times."""
    base = Settings()
    gguf = gguf_of(name, base.llm.models_dir)
    with (
        tempfile.TemporaryDirectory() as tmp,
        llama_service(LOG_DIR, gguf=gguf, alias=name, threads=threads) as llm,
    ):
        settings = base.model_copy(
            update={
                "llm": base.llm.model_copy(
                    update={
                        "backend": "openai",
                        "base_url": llm.url + "/v1",
                        "model": name,
                        "model_version": f"{name}-{gguf.stem.rsplit('-', 1)[-1]}-llamacpp",
                    }
                )
            }
        )
        out = Path(tmp) / "signals.jsonl"
        load_before = os.getloadavg()[0]
        stats = synthesize(settings, questions, out, k=k, batch_questions=len(questions))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        load_after = os.getloadavg()[0]
    written = stats["written"]
    score_s = [r["score_seconds"] for r in rows]
    return {
        "model": name,
        "gguf": gguf.name,
        "questions": written,
        "k": k,
        "candidates": [len(r["candidates"]) for r in rows],
        "pseudo_kept": sum(any(c["pseudo"] for c in r["candidates"]) for r in rows),
        "seconds_total": stats["seconds"],
        "seconds_per_question": stats["seconds"] / written,
        "scoring_seconds_per_question": statistics.fmean(score_s),
        "pseudo_and_retrieval_seconds_per_question": (stats["seconds"] - sum(score_s)) / written,
        "scorer": stats["scorer"],
        "scorer_dtype": stats["scorer_dtype"],
        "generator": stats["generator"],
        # the 1-minute load average around the run: above the core count, others were running
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
    }


def main() -> None:
    """Measure each model on the first ``--per-file`` questions of each training file."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    p.add_argument("--per-file", type=int, default=1, help="questions per training file")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--name", default="gain_signals")
    args = p.parse_args()
    questions = training_questions(TRAIN, args.per_file, seed=0)
    results = [measure(m, questions, args.k, args.threads) for m in args.models]
    md = "\n".join(
        table(
            ["model", "questions", "k", "s/question", "scoring s/q", "pseudo+retrieval s/q",
             "scorer", "load avg"],
            [
                (
                    r["model"], r["questions"], r["k"], f"{r['seconds_per_question']:.1f}",
                    f"{r['scoring_seconds_per_question']:.1f}",
                    f"{r['pseudo_and_retrieval_seconds_per_question']:.1f}", r["scorer"],
                    "-".join(map(str, r["load_avg_1m"])),
                )
                for r in results
            ],
        )
    )  # fmt: skip
    write_result(
        args.name,
        {"runs": results},
        notes=[
            "pseudo-passage: llama.cpp server on the GGUF; PPL: torch on the de-quantised GGUF",
            "model loading excluded; the machine may be shared (see its load average)",
        ],
        markdown=md,
    )


if __name__ == "__main__":
    main()
