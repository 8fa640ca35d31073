"""Per-stage latency of ``POST /answer`` over dev questions (``make bench``).

Starts the embedded service on a free loopback port unless ``--url`` is given, sends the questions
(``--concurrency`` at a time), and reports p50/p95 of every stage from the responses' ``timings_ms``
plus the client-side latency. Writes JSON and markdown to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from gainrag.evaluation.machine import machine_info  # noqa: E402
from gainrag.evaluation.metrics import percentile  # noqa: E402

STAGES = ("retrieve", "pseudo", "select", "generate", "total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GAINRAG_PORT": str(port), "GAINRAG_HOST": "127.0.0.1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gainrag.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


async def run(url: str, questions: list[str], concurrency: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(q: str) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/answer", json={"question": q})
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
    }


def to_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# /answer latency ({report['started']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Service: {report['service']}  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
        f"{report['machine']['memory_gb']} GB, torch {report['machine']['torch']}  ",
        f"Questions: {s['n']} from {report['questions']}, concurrency {report['concurrency']}, "
        f"errors {s['errors']}",
        "",
        "| stage | p50 ms | p95 ms |",
        "|---|---|---|",
    ]
    for st in STAGES:
        lines.append(
            f"| {st} | {s['stages_ms'][st]['p50']:.0f} | {s['stages_ms'][st]['p95']:.0f} |"
        )
    lines.append(
        f"| client (HTTP round trip) | {s['client_ms']['p50']:.0f} | {s['client_ms']['p95']:.0f} |"
    )
    lines += [
        "",
        f"total / critical path (max(retrieve, pseudo) + select + generate), p50: "
        f"{s['total_over_critical_path_p50']:.3f}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=ROOT / "data/questions/nq_dev.jsonl")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--url", help="benchmark a running service instead of starting one")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()

    with args.questions.open() as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()][: args.limit]
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port)
    try:
        wait_ready(url, proc)
        asyncio.run(run(url, questions[:2], 1))  # warm-up, not counted
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows = asyncio.run(run(url, questions, args.concurrency))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    report = {
        "started": started,
        "command": " ".join(["python", "benchmarks/bench_answer.py", *sys.argv[1:]]),
        "questions": str(
            args.questions.relative_to(ROOT)
            if args.questions.is_absolute() and args.questions.is_relative_to(ROOT)
            else args.questions
        ),
        "concurrency": args.concurrency,
        # With --url the service runs elsewhere: this describes only the load generator's host.
        "machine": machine_info(),
        "service": "embedded (started by this script on this machine)"
        if args.url is None
        else f"remote at {args.url}",
        "summary": summarize(rows),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"answer_latency_c{args.concurrency}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
