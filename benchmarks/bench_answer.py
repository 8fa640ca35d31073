"""Fan-out: per-stage latency of ``POST /answer`` and total against the critical path
``max(retrieve, pseudo) + select + generate`` at concurrency 1 and 16 (``make bench``).

Starts the embedded service on a free loopback port unless ``--url`` is given, sends the questions
(``--concurrency`` at a time, for each level), and reports p50/p95 of every stage from the
responses' ``timings_ms``, the client-side latency and total / critical path (target <= 1.10).
Requests bypass the cache (``Cache-Control: no-cache``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, QUESTIONS, START_S, question_texts, rel, write_result
from gainrag.evaluation.qa_metrics import percentile
from gainrag_harness import gainrag_service

STAGES = ("retrieve", "pseudo", "select", "generate", "total")
TARGET_RATIO = 1.10


async def run(url: str, questions: list[str], concurrency: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(q: str) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post(
                    "/answer", json={"question": q}, headers={"cache-control": "no-cache"}
                )
                wall = (time.perf_counter() - t) * 1000
            body = r.json()
            out.append(
                {
                    "status": r.status_code,
                    "client_ms": wall,
                    "timings_ms": body.get("timings_ms"),
                    "question": q,
                }
            )

        await asyncio.gather(*(one(q) for q in questions))
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200]
    stages = {
        s: {
            "p50": percentile([r["timings_ms"][s] for r in ok], 50),
            "p95": percentile([r["timings_ms"][s] for r in ok], 95),
        }
        for s in STAGES
    }
    client = [r["client_ms"] for r in ok]
    crit = [
        max(r["timings_ms"]["retrieve"], r["timings_ms"]["pseudo"])
        + r["timings_ms"]["select"]
        + r["timings_ms"]["generate"]
        for r in ok
    ]
    return {
        "n": len(rows),
        "errors": len(rows) - len(ok),
        "stages_ms": stages,
        "client_ms": {"p50": percentile(client, 50), "p95": percentile(client, 95)},
        "total_over_critical_path_p50": percentile(
            [r["timings_ms"]["total"] / c for r, c in zip(ok, crit, strict=True)], 50
        ),
        "total_over_critical_path_p95": percentile(
            [r["timings_ms"]["total"] / c for r, c in zip(ok, crit, strict=True)], 95
        ),
        "client_over_critical_path_p50": percentile(
            [r["client_ms"] / c for r, c in zip(ok, crit, strict=True)], 50
        ),
    }


def to_markdown(levels: dict[int, dict[str, Any]]) -> str:
    """One table: stage p50/p95 per concurrency level, then the fan-out ratios."""
    cs = sorted(levels)
    head = " | ".join(f"c={c} p50 | c={c} p95" for c in cs)
    lines = [f"| stage (ms) | {head} |", "|---|" + "---|" * (2 * len(cs))]
    for st in (*STAGES, "client"):
        cells = []
        for c in cs:
            d = levels[c]["client_ms"] if st == "client" else levels[c]["stages_ms"][st]
            cells.append(f"{d['p50']:.0f} | {d['p95']:.0f}")
        lines.append(f"| {st} | {' | '.join(cells)} |")
    lines.append("")
    for c in cs:
        s = levels[c]
        lines.append(
            f"- c={c}: {s['n']} requests, {s['errors']} errors; total / critical path p50 "
            f"{s['total_over_critical_path_p50']:.3f} (p95 "
            f"{s['total_over_critical_path_p95']:.3f}); client / critical path p50 "
            f"{s['client_over_critical_path_p50']:.3f}; target <= {TARGET_RATIO}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--limit", type=int, default=50, help="questions at concurrency 1")
    ap.add_argument("--concurrency", default="1,16", help="levels, comma-separated")
    ap.add_argument(
        "--per-level", type=int, default=2, help="questions per level = this x concurrency"
    )
    ap.add_argument("--url", help="benchmark a running service instead of starting one")
    args = ap.parse_args()

    levels_c = [int(x) for x in args.concurrency.split(",")]
    need = max(args.limit, *(c * args.per_level for c in levels_c)) + 2
    questions = question_texts(args.questions, need)
    levels: dict[int, dict[str, Any]] = {}
    rows_all: dict[int, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        serve = gainrag_service("serve", ["serve"], LOG_DIR, timeout_s=START_S)
        url = args.url or stack.enter_context(serve).url
        asyncio.run(run(url, questions[:2], 1))  # warm-up, not counted
        for c in levels_c:
            n = args.limit if c == 1 else c * args.per_level
            rows = asyncio.run(run(url, questions[2 : 2 + n], c))
            rows_all[c] = rows
            levels[c] = summarize(rows)
            print(f"c={c}: {levels[c]['stages_ms']['total']}")
    ratios = {c: levels[c]["total_over_critical_path_p50"] for c in levels}
    results = {
        "service": "embedded, started by this script" if not args.url else f"remote {args.url}",
        "questions": rel(args.questions),
        "levels": {str(c): levels[c] for c in levels},
        "target": {
            "total_over_critical_path_p50_at_most": TARGET_RATIO,
            "ratio_p50": {str(c): r for c, r in ratios.items()},
            "met": all(r <= TARGET_RATIO for r in ratios.values()),
        },
        "bound": "stage timings include queueing inside each stage's batcher, so the ratio "
        "measures only what the fan-out adds between stages",
        "rows": {str(c): rows_all[c] for c in rows_all},
    }
    md = to_markdown(levels)
    write_result("answer_fanout", results, markdown=md)


if __name__ == "__main__":
    main()
