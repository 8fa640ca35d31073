"""Answers per second and latency of ``POST /answer`` at concurrency 1, 4 and 16: a baseline
commit's default against today's, side by side in one run on one machine.

- **baseline**: the code of ``--baseline`` (default 567a7db, the default before issue 25) with its
  own defaults: its ``service/`` tree is extracted with ``git archive`` into
  ``var/bench/src-<ref>/`` and put first on ``PYTHONPATH``; models, index and the llama.cpp
  engine are the repository's (the shipped selector and the index are unchanged since then);
- **new**: this checkout's defaults;
- ``--variant NAME:KEY=VALUE,...``: this checkout with settings changed (experiments).

Each mode is started alone (never two gateways at once: they would share the two cores) and asked
the same questions, alternating nq_dev and squad_dev (their passages differ in length), after one
warm-up request, cache bypassed (``Cache-Control: no-cache``). Reported per level: answers/s
(answered requests / wall time of the level), p50/p95 of the client latency, errors by status,
and each stage's p50 from the responses' ``timings_ms``; then every mode's ratio to the baseline
(answers/s up, p50 down). Closed loop: open-loop arrival rates are the load tests' job.

    python -m benchmarks.bench_throughput                        # baseline vs new (~15 min)
    python -m benchmarks.bench_throughput --modes new --levels 1:4  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    LOG_DIR,
    ROOT,
    START_S,
    ask_answers,
    pct,
    question_texts,
    table,
    write_result,
)
from gainrag_harness import gainrag_service

NAME = "throughput"
BASELINE = "567a7db"
DATA = ROOT / "data" / "questions"
LEVELS = "1:10,4:16,16:32"  # concurrency:questions
STAGES = ("retrieve", "select", "generate")


def baseline_tree(ref: str) -> Path:
    """``var/bench/src-<ref>/service``: the service code and models of ``ref`` (extracted once;
    its ``var`` and ``data`` link to this checkout's: the same index and llama.cpp build)."""
    dest = LOG_DIR / f"src-{ref}"
    if not (dest / "service" / "gainrag" / "cli.py").exists():
        blob = subprocess.run(
            ["git", "archive", "--format=tar", ref, "service", "models"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest, filter="data")
        for shared in ("var", "data"):
            (dest / shared).symlink_to(ROOT / shared)
    return dest / "service"


def questions(n: int) -> list[str]:
    """``n`` questions, alternating nq_dev and squad_dev from the start of each."""
    nq, squad = question_texts(DATA / "nq_dev.jsonl"), question_texts(DATA / "squad_dev.jsonl")
    mixed = [q for pair in zip(nq, squad, strict=False) for q in pair]
    return mixed[:n]


async def ask(url: str, qs: list[str], concurrency: int) -> dict[str, Any]:
    """Every question once with ``concurrency`` in flight; per-request records and wall time."""
    out, wall = await ask_answers(url, qs, concurrency)
    records = [
        {
            "status": r["status"],
            "client_ms": r["client_ms"],
            "timings_ms": r["body"].get("timings_ms") or {},
            "error": None if r["status"] == 200 else (r["body"].get("error") or {}).get("type"),
        }
        for r in out
    ]
    return {"records": records, "wall_s": wall}


def summarize(run: dict[str, Any], concurrency: int) -> dict[str, Any]:
    ok = [r for r in run["records"] if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "requests": len(run["records"]),
        "answered": len(ok),
        "errors": dict(
            Counter(f"{r['status']} {r['error']}" for r in run["records"] if r not in ok)
        ),
        "wall_s": run["wall_s"],
        "answers_per_s": len(ok) / run["wall_s"],
        "client_ms": pct([r["client_ms"] for r in ok]),
        "stages_ms_p50": {
            s: statistics.median(r["timings_ms"].get(s, 0.0) for r in ok) for s in STAGES
        }
        if ok
        else {},
    }


def run_mode(
    name: str, env: dict[str, str], levels: list[tuple[int, int]], warmup: str
) -> dict[str, Any]:
    with gainrag_service(
        f"throughput-{name}", ["serve"], LOG_DIR, env=env, timeout_s=START_S
    ) as svc:
        ready = httpx.get(svc.url + "/ready", timeout=30).json()
        asyncio.run(ask(svc.url, [warmup], 1))
        out: dict[str, Any] = {"env": {k: v for k, v in env.items() if k != "PYTHONPATH"}}
        out["models"] = ready.get("models", ready)
        for c, n in levels:
            summary = summarize(asyncio.run(ask(svc.url, questions(n), c)), c)
            out[f"c{c}"] = summary
            print(
                f"{name} c={c}: {summary['answers_per_s']:.3f} answers/s, p50 "
                f"{summary['client_ms']['p50'] / 1000:.2f} s, errors {summary['errors']}",
                flush=True,
            )
    return out


def report(results: dict[str, Any], levels: list[tuple[int, int]]) -> str:
    modes = results["modes"]
    base = modes.get("baseline")
    rows = []
    for name, m in modes.items():
        for c, _ in levels:
            s = m[f"c{c}"]
            ratio = ""
            if base is not None and name != "baseline":
                b = base[f"c{c}"]
                ratio = (
                    f"{s['answers_per_s'] / b['answers_per_s']:.2f}x / "
                    f"{s['client_ms']['p50'] / b['client_ms']['p50']:.2f}x"
                )
            st = s["stages_ms_p50"]
            rows.append(
                [
                    name,
                    c,
                    f"{s['answered']}/{s['requests']}",
                    f"{s['answers_per_s']:.3f}",
                    f"{s['client_ms']['p50'] / 1000:.2f}",
                    f"{s['client_ms']['p95'] / 1000:.2f}",
                    " / ".join(f"{st.get(k, 0):.0f}" for k in STAGES),
                    ratio,
                ]
            )
    head = [
        "mode",
        "c",
        "answered",
        "answers/s",
        "p50 s",
        "p95 s",
        "retrieve / select / generate p50 ms",
        "vs baseline: answers/s / p50",
    ]
    lines = table(head, rows)
    for name, m in modes.items():
        lines.append(f"\n- **{name}**: env `{m['env'] or '(defaults)'}`; models `{m['models']}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="git ref whose default is the baseline")
    ap.add_argument("--modes", default="baseline,new", help="baseline, new and variant names")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE,... this checkout with these settings (repeatable)",
    )
    ap.add_argument("--levels", default=LEVELS, help="concurrency:questions,...")
    ap.add_argument("--name", default=NAME, help="result file name under benchmarks/results/")
    a = ap.parse_args()
    levels = [(int(c), int(n)) for c, n in (x.split(":") for x in a.levels.split(","))]
    variants: dict[str, dict[str, str]] = {"new": {}}
    for v in a.variant:
        name, _, kvs = v.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    warmup = question_texts(DATA / "nq_dev.jsonl")[-1]  # not among the timed questions
    results: dict[str, Any] = {"baseline_ref": a.baseline, "levels": levels, "modes": {}}
    for mode in a.modes.split(","):
        if mode == "baseline":
            env = {"PYTHONPATH": str(baseline_tree(a.baseline))}
        else:
            env = variants[mode]
        results["modes"][mode] = run_mode(mode, env, levels, warmup)
    write_result(a.name, results, markdown=report(results, levels))


if __name__ == "__main__":
    main()
