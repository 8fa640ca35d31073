"""Gateway overhead: the real gateway with instant stand-ins for every model stage, loaded by
``wrk`` (C, closed loop) at several concurrencies. What it measures is everything the gateway does
per request: HTTP parsing, middleware, validation, the pipeline's own work over 100 candidates,
JSON serialisation, metrics and the access log.

Target: p50 under 5 ms at concurrency 32.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import LOG_DIR, table, write_result
from gainrag_harness import Service, free_port

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
LUA = """wrk.method = "POST"
wrk.body = '{"question": "who got the first nobel prize in physics"}'
wrk.headers["Content-Type"] = "application/json"
"""


def parse_wrk(text: str) -> dict[str, Any]:
    """Latency percentiles (ms), requests/s and error counts from ``wrk --latency`` output."""
    out: dict[str, Any] = {}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        out[f"p{pct}_ms"] = float(value) * UNITS[unit]
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", text)
    out["socket_errors"] = m.group(1).strip() if m else ""
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--levels", default="1,32,64", help="concurrent connections")
    ap.add_argument("--duration", type=int, default=20, help="seconds per level")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--quick", action="store_true", help="5 s per level")
    args = ap.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is not installed: scripts/system-deps.sh bench (apt-get install wrk)")
    duration = 5 if args.quick else args.duration
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.gateway_standin", "--port", str(port)]
    cmd += ["--workers", str(args.workers)]
    # Above the largest level so that the in-flight limit measures latency, not 429s.
    env = {"GAINRAG_API__MAX_IN_FLIGHT": str(max(levels) * 2)}
    server = Service("gateway_standin", cmd, port, LOG_DIR, env=env, probe="/ready")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, server:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        base = [wrk, "-t1", "--latency", "-s", str(script)]
        subprocess.run([*base, "-c4", "-d3s", server.url + "/answer"], capture_output=True)
        for c in levels:
            run = [*base, f"-c{c}", f"-d{duration}s", "--timeout", "10s", server.url + "/answer"]
            text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
            rows.append({"concurrency": c, **parse_wrk(text)})
            print(f"c={c}: {rows[-1]}")
    by_c = {r["concurrency"]: r for r in rows}
    target_c = 32 if 32 in by_c else max(by_c)
    p50 = by_c[target_c]["p50_ms"]
    max_rps = max(r["rps"] for r in rows)
    per_request_ms = 1000.0 / max_rps if max_rps else 0.0
    results = {
        "levels": rows,
        "workers": args.workers,
        "duration_s": duration,
        "max_rps": max_rps,
        "cpu_ms_per_request": per_request_ms,
        "target": {"concurrency": target_c, "p50_ms_below": 5.0, "p50_ms": p50, "met": p50 < 5.0},
        "bound": (
            f"closed loop at {target_c} connections: p50 ~ {target_c} / throughput "
            f"(Little's law); throughput is bound by ~{per_request_ms:.2f} ms of Python per "
            "request on one event loop, with wrk on the same cores"
        ),
    }
    head = ["concurrency", "p50 ms", "p75 ms", "p90 ms", "p99 ms", "requests/s", "non-2xx"]
    pcts = ("p50_ms", "p75_ms", "p90_ms", "p99_ms")
    md = table(
        head,
        (
            [r["concurrency"], *(f"{r[k]:.2f}" for k in pcts), f"{r['rps']:.0f}", r["non_2xx"]]
            for r in rows
        ),
    )
    md += ["", f"Target p50 < 5 ms at concurrency {target_c}: {'met' if p50 < 5 else 'missed'}."]
    write_result("gateway", results, markdown="\n".join(md))


if __name__ == "__main__":
    main()
