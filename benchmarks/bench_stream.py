"""Streaming latency of ``POST /answer``: time to the first event (the citation), to the first
token and to the end, at concurrency 1 and 16 (``make bench``).

Starts the embedded service on a free loopback port unless ``--url`` is given, sends the questions
with ``"stream": true`` (``--concurrency`` at a time, for each level), and reports p50/p95 of the
client-side times to the ``passages`` event, to the first ``token`` event and to ``done``, beside
the server's stage timings from ``done``. Requests bypass the cache (``Cache-Control: no-cache``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, QUESTIONS, START_S, pct, question_texts, rel, write_result
from gainrag_harness import gainrag_service

CLIENT = ("first_event", "first_token", "total")
SERVER = ("retrieve", "pseudo", "select", "generate", "total")


async def one(client: httpx.AsyncClient, question: str) -> dict[str, Any]:
    """One streamed answer: client times (ms) to each milestone, and ``done``'s timings."""
    row: dict[str, Any] = {"question": question, "status": None, "tokens": 0}
    start = time.perf_counter()
    event = ""
    async with client.stream(
        "POST",
        "/answer",
        json={"question": question, "stream": True},
        headers={"cache-control": "no-cache"},
    ) as r:
        row["status"] = r.status_code
        async for line in r.aiter_lines():
            now = (time.perf_counter() - start) * 1000
            if line.startswith("event: "):
                event = line[7:]
                if event == "passages":
                    row["first_event"] = now
                elif event == "token":
                    row["tokens"] += 1
                    row.setdefault("first_token", now)
            elif line.startswith("data: ") and event in ("done", "error"):
                row["event"] = event
                if event == "done":
                    row["timings_ms"] = json.loads(line[6:])["timings_ms"]
    row["total"] = (time.perf_counter() - start) * 1000
    return row


async def run(url: str, questions: list[str], concurrency: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def limited(q: str) -> dict[str, Any]:
            async with sem:
                return await one(client, q)

        return list(await asyncio.gather(*(limited(q) for q in questions)))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200 and r.get("event") == "done"]
    # An answer of zero tokens (an empty cleaned answer) has no first token.
    return {
        "n": len(rows),
        "errors": len(rows) - len(ok),
        "client_ms": {k: pct([r[k] for r in ok if k in r]) for k in CLIENT},
        "server_ms": {k: pct([r["timings_ms"][k] for r in ok]) for k in SERVER},
        "tokens_events_mean": sum(r["tokens"] for r in ok) / max(1, len(ok)),
    }


def to_markdown(levels: dict[int, dict[str, Any]]) -> str:
    cs = sorted(levels)
    head = " | ".join(f"c={c} p50 | c={c} p95" for c in cs)
    lines = [f"| ms | {head} |", "|---|" + "---|" * (2 * len(cs))]
    labels = {"first_event": "first event (citation)", "first_token": "first token"}
    for k in CLIENT:
        cells = [
            f"{levels[c]['client_ms'][k]['p50']:.0f} | {levels[c]['client_ms'][k]['p95']:.0f}"
            for c in cs
        ]
        lines.append(f"| {labels.get(k, 'total (client)')} | {' | '.join(cells)} |")
    for k in SERVER:
        cells = [
            f"{levels[c]['server_ms'][k]['p50']:.0f} | {levels[c]['server_ms'][k]['p95']:.0f}"
            for c in cs
        ]
        lines.append(f"| server {k} | {' | '.join(cells)} |")
    lines.append("")
    for c in cs:
        s = levels[c]
        lines.append(
            f"- c={c}: {s['n']} requests, {s['errors']} errors, "
            f"{s['tokens_events_mean']:.1f} token events per answer on average"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--limit", type=int, default=20, help="questions at concurrency 1")
    ap.add_argument("--concurrency", default="1,16", help="levels, comma-separated")
    ap.add_argument(
        "--per-level", type=int, default=2, help="questions per level = this x concurrency"
    )
    ap.add_argument("--url", help="benchmark a running service instead of starting one")
    ap.add_argument("--name", default="answer_stream", help="result file name")
    args = ap.parse_args()

    levels_c = [int(x) for x in args.concurrency.split(",")]
    need = max(args.limit, *(c * args.per_level for c in levels_c)) + 2
    questions = question_texts(args.questions, need)
    levels: dict[int, dict[str, Any]] = {}
    rows_all: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            serve = gainrag_service("serve", ["serve"], LOG_DIR, timeout_s=START_S)
            url = stack.enter_context(serve).url
        asyncio.run(run(url, questions[:2], 1))  # warm-up, not counted
        for c in levels_c:
            n = args.limit if c == 1 else c * args.per_level
            rows = asyncio.run(run(url, questions[2 : 2 + n], c))
            rows_all[str(c)] = rows
            levels[c] = summarize(rows)
            print(f"c={c}: {levels[c]['client_ms']}")
    results = {
        "service": f"remote {args.url}" if args.url else "embedded, started by this script",
        "questions": rel(args.questions),
        "levels": {str(c): levels[c] for c in levels},
        "rows": rows_all,
    }
    write_result(args.name, results, markdown=to_markdown(levels))


if __name__ == "__main__":
    main()
