"""Cache: ``/answer`` latency on a Redis cache hit (embedded service + a real redis-server).

Warms the cache with ``--questions`` questions, then asks them again ``--rounds`` times one at a
time and reports client-side p50/p95/p99 of the hits (and the server's own ``total``), next to
the uncached latency of the same questions measured during warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, QUESTIONS, START_S, pct, question_texts, table, write_result
from gainrag_harness import gainrag_service, redis_service


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--limit", type=int, default=10, help="distinct questions")
    ap.add_argument("--rounds", type=int, default=30, help="hits per question")
    args = ap.parse_args()
    questions = question_texts(args.questions, args.limit)
    misses: list[float] = []
    hits: list[float] = []
    server_hits: list[float] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_service(LOG_DIR))
        env = {"GAINRAG_REDIS__URL": f"{redis.url}/0"}
        serve = gainrag_service("serve", ["serve"], LOG_DIR, env, timeout_s=START_S)
        server = stack.enter_context(serve)
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
    hit, miss, server_hit = pct(hits), pct(misses), pct(server_hits)
    results = {
        "hit_client_ms": hit,
        "hit_server_total_ms": server_hit,
        "miss_client_ms": miss,
        "speedup_p50": miss["p50"] / hit["p50"] if hit["p50"] else 0.0,
        "bound": "a hit is one Redis GET on loopback plus the gateway's own per-request work "
        "(parsing, validation, serialising the cached passages)",
    }
    rows = [
        ("hit (client)", *(f"{hit[k]:.2f}" for k in ("p50", "p95", "p99")), hit["n"]),
        ("hit (server total)", *(f"{server_hit[k]:.2f}" for k in ("p50", "p95", "p99")), hit["n"]),
        ("miss (client)", *(f"{miss[k]:.0f}" for k in ("p50", "p95", "p99")), miss["n"]),
    ]
    md = "\n".join(table(["", "p50 ms", "p95 ms", "p99 ms", "n"], rows))
    write_result("cache", results, markdown=md)


if __name__ == "__main__":
    main()
