"""Fan-out: per-stage latency of ``POST /answer`` and total against the critical path
``max(retrieve, pseudo) + select + generate`` at concurrency 1 and 16 (``make bench``), with
pipelined selection on and off side by side.

Starts one embedded service per mode (``GAINRAG_PIPELINE__PIPELINED_SELECTION`` true / false, the
same models and settings otherwise) side by side on free loopback ports unless ``--url`` is given;
for each concurrency level it sends the same questions to each mode in turn (only one service
works at a time, so they do not compete for the CPU). It reports p50/p95 of every stage from the
responses' ``timings_ms``, the client-side latency, total / critical path (target <= 1.10), and
for pipelined selection the per-request critical-path saving: ``select_retrieved +
select_pseudo - select``, the selection time that ran behind the other branch instead of after
both (what the one k+1 call would have added, taking it as the sum of the two calls), beside the
measured difference of p50 totals between the modes. ``select`` is the selection time on the
critical path (docs/api.md). Requests bypass the cache (``Cache-Control: no-cache``).

    python -m benchmarks.bench_answer                       # the full run (make bench)
    python -m benchmarks.bench_answer --limit 2 --concurrency 1,2 --per-level 1   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LOG_DIR,
    QUESTIONS,
    START_S,
    ask_answers,
    question_texts,
    rel,
    write_result,
)
from gainrag.evaluation.qa_metrics import percentile
from gainrag_harness import gainrag_service, running

STAGES = ("retrieve", "pseudo", "select", "select_retrieved", "select_pseudo", "generate", "total")
TARGET_RATIO = 1.10
MODES = {"on": "true", "off": "false"}  # pipelined selection


async def run(url: str, questions: list[str], concurrency: int) -> list[dict[str, Any]]:
    out, _ = await ask_answers(url, questions, concurrency)
    return [{**r, "timings_ms": r["body"].get("timings_ms")} for r in out]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200]
    stages = {
        s: {
            "p50": percentile([r["timings_ms"].get(s, 0.0) for r in ok], 50),
            "p95": percentile([r["timings_ms"].get(s, 0.0) for r in ok], 95),
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
    # Selection time taken off the critical path by pipelining (0 when it is off).
    saving = [
        t["select_retrieved"] + t["select_pseudo"] - t["select"]
        if t.get("select_retrieved") or t.get("select_pseudo")
        else 0.0
        for t in (r["timings_ms"] for r in ok)
    ]
    return {
        "n": len(rows),
        "errors": len(rows) - len(ok),
        "stages_ms": stages,
        "critical_path_ms": {"p50": percentile(crit, 50), "p95": percentile(crit, 95)},
        "pipelined_saving_ms": {"p50": percentile(saving, 50), "p95": percentile(saving, 95)},
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


def to_markdown(modes: dict[str, dict[int, dict[str, Any]]]) -> str:
    """One table: stage p50/p95 per concurrency level and mode, then the ratios and savings."""
    cols = [(m, c) for c in sorted(next(iter(modes.values()))) for m in modes]
    head = " | ".join(f"{m} c={c} p50 | {m} c={c} p95" for m, c in cols)
    lines = [
        "Pipelined selection: on = score the retrieved passages while the pseudo-passage is "
        "written; off = score all k+1 after both.",
        "",
        f"| stage (ms) | {head} |",
        "|---|" + "---|" * (2 * len(cols)),
    ]
    for st in (*STAGES, "critical_path", "client", "pipelined_saving"):
        cells = []
        for m, c in cols:
            lv = modes[m][c]
            d = lv[f"{st}_ms"] if st in ("critical_path", "client", "pipelined_saving") else None
            d = d or lv["stages_ms"][st]
            cells.append(f"{d['p50']:.0f} | {d['p95']:.0f}")
        lines.append(f"| {st} | {' | '.join(cells)} |")
    lines.append("")
    for m, c in cols:
        s = modes[m][c]
        lines.append(
            f"- {m}, c={c}: {s['n']} requests, {s['errors']} errors; total / critical path p50 "
            f"{s['total_over_critical_path_p50']:.3f} (p95 "
            f"{s['total_over_critical_path_p95']:.3f}); client / critical path p50 "
            f"{s['client_over_critical_path_p50']:.3f}; target <= {TARGET_RATIO}"
        )
    if {"on", "off"} <= set(modes):
        for c in sorted(modes["on"]):
            on, off = modes["on"][c], modes["off"][c]
            lines.append(
                f"- c={c}: total p50 off - on = "
                f"{off['stages_ms']['total']['p50'] - on['stages_ms']['total']['p50']:.0f} ms "
                f"(p95 {off['stages_ms']['total']['p95'] - on['stages_ms']['total']['p95']:.0f} "
                f"ms); per-request critical-path saving with pipelining p50 "
                f"{on['pipelined_saving_ms']['p50']:.0f} ms (p95 "
                f"{on['pipelined_saving_ms']['p95']:.0f} ms)"
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
    ap.add_argument(
        "--modes",
        default="on,off",
        help="pipelined selection on and/or off, comma-separated (one service per mode)",
    )
    ap.add_argument("--url", help="benchmark a running service (one mode) instead of starting")
    args = ap.parse_args()

    levels_c = [int(x) for x in args.concurrency.split(",")]
    names = [m.strip() for m in args.modes.split(",")]
    if unknown := set(names) - set(MODES):
        ap.error(f"--modes: unknown {sorted(unknown)}; use on, off")
    if args.url:
        names = ["url"]  # whatever the running service is configured with
    need = max(args.limit, *(c * args.per_level for c in levels_c)) + 2
    questions = question_texts(args.questions, need)
    modes: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in names}
    rows_all: dict[str, dict[int, list[dict[str, Any]]]] = {m: {} for m in names}
    with contextlib.ExitStack() as stack:
        if args.url:
            urls = {"url": args.url}
        else:
            services = {
                m: gainrag_service(
                    f"serve-pipelined-{m}",
                    ["serve"],
                    LOG_DIR,
                    {"GAINRAG_PIPELINE__PIPELINED_SELECTION": MODES[m]},
                    timeout_s=START_S,
                )
                for m in names
            }
            stack.enter_context(running(services, order=tuple(services)))
            urls = {m: svc.url for m, svc in services.items()}
        for m in names:
            asyncio.run(run(urls[m], questions[:2], 1))  # warm-up, not counted
        for c in levels_c:
            n = args.limit if c == 1 else c * args.per_level
            for m in names:  # the same questions in each mode, one mode at a time
                rows = asyncio.run(run(urls[m], questions[2 : 2 + n], c))
                rows_all[m][c] = rows
                modes[m][c] = summarize(rows)
                print(f"{m} c={c}: {modes[m][c]['stages_ms']['total']}")
    main_mode = names[0]
    levels = modes[main_mode]
    ratios = {c: levels[c]["total_over_critical_path_p50"] for c in levels}
    comparison = {}
    if {"on", "off"} <= set(names):
        comparison = {
            str(c): {
                "total_p50_off_minus_on_ms": modes["off"][c]["stages_ms"]["total"]["p50"]
                - modes["on"][c]["stages_ms"]["total"]["p50"],
                "total_p95_off_minus_on_ms": modes["off"][c]["stages_ms"]["total"]["p95"]
                - modes["on"][c]["stages_ms"]["total"]["p95"],
                "critical_path_p50_off_minus_on_ms": modes["off"][c]["critical_path_ms"]["p50"]
                - modes["on"][c]["critical_path_ms"]["p50"],
                "pipelined_saving_ms": modes["on"][c]["pipelined_saving_ms"],
            }
            for c in levels_c
        }
    results = {
        "service": "embedded, one per mode, started by this script"
        if not args.url
        else f"remote {args.url}",
        "questions": rel(args.questions),
        "levels": {str(c): levels[c] for c in levels},  # the first mode's (on by default)
        "levels_mode": main_mode,
        "modes": {m: {str(c): modes[m][c] for c in modes[m]} for m in names},
        "pipelined_vs_not": comparison,
        "target": {
            "total_over_critical_path_p50_at_most": TARGET_RATIO,
            "ratio_p50": {str(c): r for c, r in ratios.items()},
            "met": all(r <= TARGET_RATIO for r in ratios.values()),
        },
        "bound": "stage timings include queueing inside each stage's batcher, so the ratio "
        "measures only what the fan-out adds between stages; the per-request saving takes the "
        "unpipelined k+1 call as the sum of the two pipelined calls (on a shared CPU the "
        "selector and the LLM also compete for the same cores, which the measured difference "
        "of totals includes)",
        "rows": {m: {str(c): rows_all[m][c] for c in rows_all[m]} for m in names},
    }
    md = to_markdown(modes)
    write_result("answer_fanout", results, markdown=md)


if __name__ == "__main__":
    main()
