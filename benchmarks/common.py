"""What the benchmarks share beyond :mod:`gainrag_harness` (processes, questions, machine):
sample statistics, markdown tables and the result file format (``benchmarks/results/<name>.json``:
the command, the machine, the figures, the targets and what bounds each figure).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from gainrag.config import REPO_ROOT
from gainrag.evaluation.qa_metrics import percentile
from gainrag_harness import load_questions, machine_info, machine_line

ROOT = REPO_ROOT
RESULTS = ROOT / "benchmarks" / "results"
LOG_DIR = ROOT / "var" / "bench"  # the logs of the services a benchmark starts
START_S = 600.0  # model loading on a busy 2-core machine: minutes, not seconds
QUESTIONS = ROOT / "data" / "questions" / "nq_dev.jsonl"


def question_texts(path: Path, limit: int | None = None) -> list[str]:
    """The question texts of the first ``limit`` rows (benchmarks only ask; no answers needed)."""
    return [row["question"] for row in load_questions(path, limit, answers=False)]


async def ask_answers(
    url: str, questions: Sequence[str], concurrency: int, extra: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """``POST /answer`` for every question, ``concurrency`` in flight, the cache bypassed: one
    record per request (``status``, ``client_ms``, ``question``, ``body``) and the wall time
    of them all in seconds. ``extra`` adds fields to each request body."""
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one(q: str) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post(
                    "/answer",
                    json={"question": q, **(extra or {})},
                    headers={"cache-control": "no-cache"},
                )
                ms = (time.perf_counter() - t) * 1000
            out.append({"status": r.status_code, "client_ms": ms, "question": q, "body": r.json()})

        start = time.perf_counter()
        await asyncio.gather(*(one(q) for q in questions))
        return out, time.perf_counter() - start


def rel(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (result files stay portable)."""
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table's lines."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pct(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of a sample (empty -> NaN-free zeros)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "n": 0}
    return {
        "p50": percentile(list(values), 50),
        "p95": percentile(list(values), 95),
        "p99": percentile(list(values), 99),
        "mean": sum(values) / len(values),
        "n": len(values),
    }


def write_result(
    name: str,
    results: dict[str, Any],
    *,
    argv: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    markdown: str | None = None,
) -> Path:
    """Write ``benchmarks/results/<name>.json`` (+ ``.md`` if given, also printed) with the
    command and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    how = ["-m", spec.name] if spec is not None else [rel(Path(sys.argv[0]))]
    report: dict[str, Any] = {
        "benchmark": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *how, *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "results": results,
        "notes": list(notes),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        header = f"Command: `{report['command']}`  \nMachine: {machine_line(report['machine'])}\n\n"
        (RESULTS / f"{name}.md").write_text(header + markdown.rstrip() + "\n")
        print(markdown)
    return path


def matmul_peak(
    sizes: list[int], reps: int, device: str = "cpu", dtype: Any = None
) -> dict[str, Any]:
    """Best-of-``reps`` GFLOP/s of ``torch.matmul`` on square matrices (FLOP = 2 n^3); the
    machine's measured peak that the selector and LLM benchmarks compare against."""
    import torch

    dtype = dtype or torch.float32
    per_size: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.matmul(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        per_size[str(n)] = 2.0 * n**3 / best / 1e9
        del a, b
    return {
        "gflops": max(per_size.values()),
        "per_size_gflops": per_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "reps": reps,
    }
