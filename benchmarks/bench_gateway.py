"""Gateway overhead: the real gateway with instant stand-ins for every model stage, loaded by
``wrk`` (C, closed loop) at several concurrencies. What it measures is everything the gateway does
per request: HTTP parsing, middleware, validation, the pipeline's own work over 100 candidates,
JSON serialisation, metrics and the access log.

Target: p50 under 5 ms at concurrency 32.

``--compare-tracing``: the same gateway twice, tracing off and on (OpenTelemetry, every span
written by the ``file`` exporter: the SDK's whole per-request work, with a local file instead of
a collector's network), levels run off / on / off / on ... (``--rounds``), side by side as
ratios -> ``benchmarks/results/gateway_tracing.{json,md}``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
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
    ap.add_argument("--compare-tracing", action="store_true", help="tracing off vs on")
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs per level (tracing)")
    args = ap.parse_args()
    if args.compare_tracing:
        compare_tracing(args)
        return
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


def _standin(port: int, workers: int, env: dict[str, str], name: str) -> Service:
    cmd = [sys.executable, "-m", "benchmarks.gateway_standin", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    return Service(name, cmd, port, LOG_DIR, env=env, probe="/ready")


def compare_tracing(args: argparse.Namespace) -> None:
    """Tracing off vs on, level by level, alternating, on the same machine in one run."""
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is not installed: scripts/system-deps.sh bench (apt-get install wrk)")
    duration = 5 if args.quick else args.duration
    levels = [int(x) for x in args.levels.split(",")]
    common = {"GAINRAG_API__MAX_IN_FLIGHT": str(max(levels) * 2)}
    with tempfile.TemporaryDirectory() as tmp:
        spans = Path(tmp) / "spans" / "{service}.jsonl"
        on_env = {
            **common,
            "GAINRAG_TRACING__EXPORTER": "file",
            "GAINRAG_TRACING__FILE": str(spans),
        }
        servers = {
            "off": _standin(free_port(), args.workers, common, "gateway_standin_off"),
            "on": _standin(free_port(), args.workers, on_env, "gateway_standin_on"),
        }
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        base = [wrk, "-t1", "--latency", "-s", str(script)]
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        with servers["off"], servers["on"]:
            for s in servers.values():  # warm-up
                subprocess.run([*base, "-c4", "-d3s", s.url + "/answer"], capture_output=True)
            for c in levels:
                for _ in range(args.rounds):
                    for mode, s in servers.items():
                        run = [*base, f"-c{c}", f"-d{duration}s", "--timeout", "10s"]
                        out = subprocess.run(
                            [*run, s.url + "/answer"], capture_output=True, text=True, check=True
                        ).stdout
                        runs[mode].append({"concurrency": c, **parse_wrk(out)})
        span_lines = sum(1 for _ in (Path(tmp) / "spans").glob("*.jsonl"))
    rows, results = [], []
    for c in levels:
        off = [r for r in runs["off"] if r["concurrency"] == c]
        on = [r for r in runs["on"] if r["concurrency"] == c]
        med = {
            m: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "rps")}
            for m, rs in (("off", off), ("on", on))
        }
        results.append({"concurrency": c, "off": med["off"], "on": med["on"], "runs": off + on})
        rows.append(
            [
                c,
                f"{med['off']['p50_ms']:.2f} / {med['on']['p50_ms']:.2f}",
                f"{med['on']['p50_ms'] / med['off']['p50_ms']:.2f}x",
                f"{med['off']['rps']:.0f} / {med['on']['rps']:.0f}",
                f"{med['on']['rps'] / med['off']['rps']:.2f}x",
                f"{1000 / med['on']['rps'] - 1000 / med['off']['rps']:.3f}",
            ]
        )
    md = [
        "# Gateway overhead of tracing (OpenTelemetry on, every span exported to a file)",
        "",
        f"wrk closed loop, {duration} s a run, {args.rounds} off/on pairs per level, medians.",
        "",
        *table(
            ["concurrency", "p50 ms off / on", "on / off", "requests/s off / on", "on / off",
             "CPU ms per request added"],
            rows,
        ),
    ]  # fmt: skip
    write_result(
        "gateway_tracing",
        {
            "levels": results,
            "duration_s": duration,
            "rounds": args.rounds,
            "span_files": span_lines,
        },
        markdown="\n".join(md),
    )


if __name__ == "__main__":
    main()
