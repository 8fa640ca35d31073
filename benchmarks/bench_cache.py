"""Cache: ``/answer`` latency on a Redis cache hit (embedded service + a real redis-server).

Warms the cache with ``--questions`` questions, then asks them again ``--rounds`` times one at a
time and reports client-side p50/p95/p99 of the hits (and the server's own ``total``), next to
the uncached latency of the same questions measured during warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, Server, free_port, load_questions, pct, write_result


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    """Until something accepts connections on the loopback port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    sys.exit(f"nothing listens on port {port}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=ROOT / "data/questions/nq_dev.jsonl")
    ap.add_argument("--limit", type=int, default=10, help="distinct questions")
    ap.add_argument("--rounds", type=int, default=30, help="hits per question")
    args = ap.parse_args()
    redis = shutil.which("redis-server")
    if redis is None:
        sys.exit("redis-server is not installed: run scripts/system-deps.sh")
    questions = load_questions(args.questions, args.limit)
    port = free_port()
    misses: list[float] = []
    hits: list[float] = []
    server_hits: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        redis_cmd = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(proc.terminate)
        wait_for_port(port)
        env = {"GAINRAG_REDIS__URL": f"redis://127.0.0.1:{port}/0"}
        server = stack.enter_context(Server.gainrag("serve", env=env))
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for q in questions:  # warm-up: the uncached answer, stored in the cache
                t = time.perf_counter()
                r = client.post("/answer", json={"question": q})
                misses.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            for _ in range(args.rounds):
                for q in questions:
                    t = time.perf_counter()
                    r = client.post("/answer", json={"question": q})
                    elapsed = (time.perf_counter() - t) * 1000
                    body: dict[str, Any] = r.json()
                    if r.status_code != 200 or not body.get("cached"):
                        sys.exit(f"expected a cache hit, got {r.status_code}: {r.text[:200]}")
                    hits.append(elapsed)
                    server_hits.append(float(body["timings_ms"]["total"]))
    hit, miss = pct(hits), pct(misses)
    results = {
        "hit_client_ms": hit,
        "hit_server_total_ms": pct(server_hits),
        "miss_client_ms": miss,
        "speedup_p50": miss["p50"] / hit["p50"] if hit["p50"] else 0.0,
        "bound": "a hit is one Redis GET on loopback plus the gateway's own per-request work "
        "(parsing, validation, serialising the cached passages)",
    }
    md = "\n".join(
        [
            "| | p50 ms | p95 ms | p99 ms | n |",
            "|---|---|---|---|---|",
            f"| hit (client) | {hit['p50']:.2f} | {hit['p95']:.2f} | {hit['p99']:.2f} "
            f"| {hit['n']} |",
            f"| hit (server total) | {results['hit_server_total_ms']['p50']:.2f} | "
            f"{results['hit_server_total_ms']['p95']:.2f} | "
            f"{results['hit_server_total_ms']['p99']:.2f} | {hit['n']} |",
            f"| miss (client) | {miss['p50']:.0f} | {miss['p95']:.0f} | {miss['p99']:.0f} | "
            f"{miss['n']} |",
        ]
    )
    write_result("cache", results, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
