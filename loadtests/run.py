"""Load test of ``POST /answer`` with Locust, headless (``make loadtest``): a closed-loop
concurrency sweep and open-loop arrival rates, streamed or not.

For every scenario (``uncached``, ``cached``) and every concurrency level, runs
``python -m locust -f loadtests/locustfile.py --headless -u N -r N -t Ds`` as a child process,
and for the uncached scenario also one open-loop run per arrival rate (``LOADTEST_RATE``: the
locustfile's arrival process starts requests on a fixed schedule whether or not earlier ones
finished), against ``--url`` or an embedded service it starts itself (with a private
redis-server for the answer cache). From Locust's CSV files and the per-request samples it
writes ``loadtest.json``, ``loadtest.md`` and ``loadtest.png`` to ``--out``: per level and rate
the time to the citation (the ``passages`` event), to the first token, the inter-token latency
and the total, p50/p95; latency against the arrival rate; and the knee, the highest rate whose
p95 total (a failed request counting as over the bound) stays under ``--p95-bound-s``.

With ``--cache-hit-ratio R`` the uncached scenario becomes ``mixed``: a share R of its requests
repeats a pre-warmed question (a cache hit), the rest send ``Cache-Control: no-cache``.
Percentiles are exact, from the samples (Locust's own, rounded to 2 significant digits above
100 ms, are in the JSON as ``latency_ms``).

Run from the repository root: ``python -m loadtests.run --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from gainrag.config import REPO_ROOT as ROOT
from gainrag.evaluation.qa_metrics import percentile
from gainrag_harness import (
    gainrag_service,
    load_questions,
    machine_info,
    machine_line,
    redis_service,
)
from loadtests.measure import ARRIVALS, knee, p95_with_errors, question_pool, stats

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
DEV_SETS = [ROOT / "data/questions/nq_dev.jsonl", ROOT / "data/questions/squad_dev.jsonl"]
SCENARIOS = {
    "uncached": "every request sends `Cache-Control: no-cache`: the service recomputes the "
    "answer (cache reads skipped)",
    "mixed": "a share {ratio:.0%} of the requests repeats one of the {warm} pre-warmed questions "
    "(no header: answered from the Redis cache), the rest send `Cache-Control: no-cache` and are "
    "recomputed",
    "cached": "questions from a small set answered once beforehand: nearly every request is "
    "answered from the Redis answer cache",
}
STAGES = ("retrieve", "pseudo", "select", "generate", "total")
SMOKE: dict[str, Any] = {"levels": "1,2", "duration": 20.0, "cached_duration": 5.0}
SMOKE.update(rates="0.1,0.2,0.4", rate_duration=20.0, limit=10, cached_set=5)
DEFAULTS: dict[str, Any] = {"levels": "1,4,16,64", "duration": 90.0, "cached_duration": 20.0}
DEFAULTS.update(rates="0.2,0.4,0.8", rate_duration=120.0, limit=200, cached_set=20)
SECRET = re.compile(r"(^|_)(key|token|password|secret)$", re.I)  # setting names, not values


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--url", help="load-test a running service (default: start one here)")
    ap.add_argument(
        "--levels", help=f"closed-loop concurrency levels (default {DEFAULTS['levels']})"
    )
    ap.add_argument(
        "--duration",
        type=float,
        help=f"seconds per uncached closed-loop level (default {DEFAULTS['duration']:.0f})",
    )
    ap.add_argument(
        "--cached-duration",
        type=float,
        help=f"seconds per cached level (default {DEFAULTS['cached_duration']:.0f})",
    )
    ap.add_argument(
        "--rates",
        help="open-loop arrival rates, requests/s, at least three (uncached or mixed scenario; "
        f"default {DEFAULTS['rates']}); 'none' runs no open loop",
    )
    ap.add_argument(
        "--rate-duration",
        type=float,
        help="seconds of arrivals per rate; those in flight then get --stop-timeout to finish "
        f"(default {DEFAULTS['rate_duration']:.0f})",
    )
    ap.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        default="uniform",
        help="open-loop spacing: uniform (every 1/rate s, the default) or poisson (exponential "
        "gaps, bursts included)",
    )
    ap.add_argument(
        "--cache-hit-ratio",
        type=float,
        default=0.0,
        help="share of the uncached scenario's requests that repeat a pre-warmed question (a "
        "cache hit; the rest send no-cache); > 0 names the scenario 'mixed' (default 0)",
    )
    ap.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='"stream": true and time the Server-Sent Events (default); --no-stream: one JSON '
        "body, total time only",
    )
    ap.add_argument(
        "--p95-bound-s",
        type=float,
        default=30.0,
        help="the knee is the highest arrival rate whose p95 total, failed requests counting "
        "as over it, stays under this (default 30 s)",
    )
    ap.add_argument("--scenarios", default="uncached,cached", help="uncached,cached")
    ap.add_argument(
        "--questions",
        type=Path,
        nargs="+",
        default=DEV_SETS,
        help="JSONL question files, taken in turn (default the nq and squad dev sets)",
    )
    ap.add_argument(
        "--limit",
        type=int,
        help=f"questions computed answers are drawn from (default {DEFAULTS['limit']})",
    )
    ap.add_argument(
        "--cached-set",
        type=int,
        help="the first this many of those are pre-warmed; cache hits repeat them "
        f"(default {DEFAULTS['cached_set']})",
    )
    ap.add_argument(
        "--stop-timeout",
        type=float,
        default=150.0,
        help="after a level's duration, let requests in flight finish for up to this long "
        "(default 150 s, above the service's 120 s pipeline deadline) so slow answers are counted",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/loadtest")
    ap.add_argument(
        "--work-dir",
        type=Path,
        help="Locust CSVs, logs and samples (default var/loadtest/<UTC time>)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run: levels 1,2, 20 s (5 s cached), rates 0.1,0.2,0.4 for 20 s, 10 questions, "
        "5 pre-warmed",
    )
    args = ap.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.levels = [int(x) for x in str(args.levels).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--levels must be comma-separated integers, got {args.levels!r}")
    if not args.levels or min(args.levels) < 1:
        ap.error("--levels needs at least one level, each >= 1")
    if str(args.rates).strip().lower() == "none":
        args.rates = []
    else:
        try:
            args.rates = sorted(set(_floats(str(args.rates))))
        except ValueError:
            ap.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
        # Fewer points cannot place a knee: below it, at it and past it.
        if len(args.rates) < 3 or min(args.rates) <= 0:
            ap.error("--rates needs at least three distinct rates > 0 (or 'none')")
    if not 0 <= args.cache_hit_ratio <= 1:
        ap.error("--cache-hit-ratio must be within [0, 1]")
    if args.p95_bound_s <= 0:
        ap.error("--p95-bound-s must be > 0")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.scenarios = ["uncached" if s == "mixed" else s for s in args.scenarios]
    unknown = [s for s in args.scenarios if s not in ("uncached", "cached")]
    if unknown or not args.scenarios:
        ap.error(f"--scenarios takes uncached,cached, got {unknown or 'nothing'}")
    if args.work_dir is None:
        args.work_dir = ROOT / "var/loadtest" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return args


# ------------------------------------------------------------------------------------ Locust I/O


def _num(value: str | None) -> float | None:
    if value in (None, "", "N/A"):
        return None
    return float(value)


def parse_stats_csv(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of Locust's ``*_stats.csv`` by name (``Aggregated`` is the total)."""
    rows: dict[str, dict[str, Any]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": float(row["Requests/s"]),
                "mean": _num(row["Average Response Time"]),
                "min": _num(row["Min Response Time"]),
                "max": _num(row["Max Response Time"]),
                "p50": _num(row["50%"]),
                "p95": _num(row["95%"]),
                "p99": _num(row["99%"]),
            }
    return rows


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The locustfile's per-request rows."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _p(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def summarize_samples(rows: list[dict[str, Any]], scenario: str) -> dict[str, Any]:
    """Exact figures from the samples: errors by label, latency of the successful requests of
    the scenario's kind (all of them when mixed), the stream's timings over every successful
    request, per kind (computed, hit) and the service's median stage timings of computed ones."""
    ok = [r for r in rows if r["ok"]]
    if scenario == "mixed":
        kind = ok
    else:
        kind = [r for r in ok if bool(r.get("cached")) == (scenario == "cached")]
    ms = [float(r["ms"]) for r in kind]
    errors = Counter(str(r["error"]) for r in rows if not r["ok"])
    by_status: Counter[str] = Counter()
    for label, n in errors.items():
        by_status[label.split(" ", 1)[0]] += n

    def timings(rs: list[dict[str, Any]]) -> dict[str, Any]:
        gaps = [float(g) for r in rs for g in r.get("gaps_ms") or []]
        return {
            "citation": stats([r["citation_ms"] for r in rs if r.get("citation_ms") is not None]),
            "ttft": stats([r["ttft_ms"] for r in rs if r.get("ttft_ms") is not None]),
            "itl": stats(gaps),
            "total": stats([float(r["ms"]) for r in rs]),
        }

    hits = [r for r in ok if r.get("cached")]
    out: dict[str, Any] = {
        "requests": len(rows),
        "ok": len(ok),
        "hits": len(hits),
        "errors": len(rows) - len(ok),
        "errors_by_code": dict(sorted(errors.items())),
        "errors_by_status": dict(sorted(by_status.items())),
        "latency_ms": {
            "p50": _p(ms, 50),
            "p95": _p(ms, 95),
            "p99": _p(ms, 99),
            "mean": sum(ms) / len(ms) if ms else None,
        },
        "stream": bool(rows and rows[0].get("stream")),
        "timings_ms": timings(ok),
        "by_kind_ms": {
            "computed": timings([r for r in ok if not r.get("cached")]),
            "hit": timings(hits),
        },
        "p95_total_with_errors_ms": p95_with_errors(
            [float(r["ms"]) for r in ok], len(rows) - len(ok)
        ),
        "tokens_mean": (sum(r.get("tokens", 0) for r in ok) / len(ok)) if ok else None,
    }
    computed = [r["timings_ms"] for r in ok if not r.get("cached") and r.get("timings_ms")]
    if computed:
        out["service_p50_ms"] = {
            s: percentile([float(t[s]) for t in computed if s in t], 50) for s in STAGES
        }
    return out


def _locust_rows(prefix: Path) -> tuple[dict[str, dict[str, Any]], Path]:
    final = Path(f"{prefix}_final_stats.csv")
    stats_path = final if final.exists() else Path(f"{prefix}_stats.csv")
    if not stats_path.exists():
        raise SystemExit(f"Locust wrote no {stats_path}; see {prefix}_locust.log")
    return parse_stats_csv(stats_path), stats_path


def level_result(prefix: Path, scenario: str, users: int, duration: float) -> dict[str, Any]:
    """One closed-loop level's figures from Locust's CSV files (``<prefix>_final_stats.csv``,
    written by the locustfile at exit, else Locust's own ``<prefix>_stats.csv``) and the
    samples."""
    rows, stats_path = _locust_rows(prefix)
    agg = rows.get("Aggregated") or {"requests": 0, "failures": 0, "rps": 0.0}
    computed = rows.get("/answer") or {"requests": 0, "rps": 0.0}
    hit = rows.get("/answer (hit)") or {"requests": 0, "rps": 0.0}
    own = hit if scenario == "cached" else computed  # Locust's latency row of the scenario's kind
    s = summarize_samples(read_samples(Path(f"{prefix}_samples.jsonl")), scenario)
    n_ok = computed["requests"] + hit["requests"]
    result: dict[str, Any] = {
        "users": users,
        "duration_s": duration,
        "elapsed_s": round(agg["requests"] / agg["rps"], 1) if agg["rps"] else None,
        "requests": agg["requests"],
        "ok": n_ok,
        "failures": agg["failures"],
        "failures_by_status": s["errors_by_status"],
        "failures_by_error": s["errors_by_code"],
        "rps": agg["rps"],
        "ok_rps": computed["rps"] + hit["rps"],
        "latency_ms": {k: own.get(k) for k in ("p50", "p95", "p99", "mean", "max")},
        "latency_all_ms": {k: agg.get(k) for k in ("p50", "p95", "p99")},
        "exact_latency_ms": s["latency_ms"],
        "stream": s["stream"],
        "timings_ms": s["timings_ms"],
        "by_kind_ms": s["by_kind_ms"],
        "p95_total_with_errors_ms": s["p95_total_with_errors_ms"],
        "tokens_mean": s["tokens_mean"],
        "hits": hit["requests"],
        "misses": computed["requests"],
        "hit_ratio": round(hit["requests"] / n_ok, 4) if n_ok else None,
        "locust_csv": str(_rel(stats_path)),
    }
    if "service_p50_ms" in s:
        result["service_p50_ms"] = s["service_p50_ms"]
    return result


def rate_result(prefix: Path, scenario: str, rate: float, duration: float) -> dict[str, Any]:
    """One open-loop rate's figures, from the samples (every request started on schedule is
    one, finished or not)."""
    _, stats_path = _locust_rows(prefix)
    samples = read_samples(Path(f"{prefix}_samples.jsonl"))
    s = summarize_samples(samples, scenario)
    starts = [float(r["t"]) for r in samples]
    ends = [float(r["t"]) + float(r["ms"]) / 1000 for r in samples]
    # Answers/s over the schedule, or longer when the last answers came after it (a backlog);
    # over the span alone, a few arrivals that finish early would overstate it.
    span = max(duration, max(ends) - min(starts)) if samples else duration
    lags = [float(r["lag_ms"]) for r in samples if r.get("lag_ms") is not None]
    result: dict[str, Any] = {
        "rate": rate,
        "duration_s": duration,
        "arrivals": len(samples),
        "arrival_rate": round(len(samples) / duration, 4) if duration else None,
        "start_lag_ms": stats(lags),
        "elapsed_s": round(span, 1),
        "requests": s["requests"],
        "ok": s["ok"],
        "failures": s["errors"],
        "failures_by_status": s["errors_by_status"],
        "failures_by_error": s["errors_by_code"],
        "ok_rps": round(s["ok"] / span, 4) if span else 0.0,
        "exact_latency_ms": s["latency_ms"],
        "stream": s["stream"],
        "timings_ms": s["timings_ms"],
        "by_kind_ms": s["by_kind_ms"],
        "p95_total_with_errors_ms": s["p95_total_with_errors_ms"],
        "tokens_mean": s["tokens_mean"],
        "hits": s["hits"],
        "hit_ratio": round(s["hits"] / s["ok"], 4) if s["ok"] else None,
        "locust_csv": str(_rel(stats_path)),
    }
    if "service_p50_ms" in s:
        result["service_p50_ms"] = s["service_p50_ms"]
    return result


def run_locust(
    url: str,
    prefix: Path,
    env_extra: dict[str, str],
    *,
    users: int,
    run_time: float,
    stop_timeout: float,
) -> None:
    """One headless Locust run; its stats land in ``<prefix>_*.csv``, its samples in
    ``<prefix>_samples.jsonl``."""
    for old in prefix.parent.glob(f"{prefix.name}_*"):
        old.unlink()
    env = {**os.environ, **env_extra, "LOADTEST_SAMPLES": f"{prefix}_samples.jsonl"}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["--users", str(users), "--spawn-rate", str(users)]
    cmd += ["--run-time", f"{max(1, round(run_time))}s"]
    cmd += ["--stop-timeout", f"{max(0, round(stop_timeout))}s", "--host", url]
    cmd += ["--csv", str(prefix), "--only-summary", "--exit-code-on-error", "0"]
    with open(f"{prefix}_locust.log", "wb") as log:
        # cwd: the repository root, where `loadtests` is importable for the locustfile
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"locust exited with {rc}; see {prefix}_locust.log")


# ------------------------------------------------------------------------- the machine's load


class CpuMeter:
    """How busy the machine was over a stretch, and how much of that was not this run (Locust,
    the service, Redis and the LLM engine are all this process's descendants): on a shared
    machine, other people's work slows the service and must be named."""

    def __init__(self) -> None:
        import psutil  # Locust's dependency, so there whenever Locust is

        self._psutil = psutil
        self.cpus = psutil.cpu_count() or 1
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        ps = self._psutil
        t = ps.cpu_times()
        # guest time is already inside user on Linux; idle, iowait and steal are not this VM's work
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        me = ps.Process()
        c = me.cpu_times()
        own = c.user + c.system + c.children_user + c.children_system
        for child in me.children(recursive=True):
            with contextlib.suppress(ps.Error):
                ct = child.cpu_times()
                own += ct.user + ct.system
        return time.monotonic(), busy, own

    def lap(self) -> dict[str, float]:
        """Since the last lap: the machine's busy share and others' share of all its CPUs."""
        now = self._read()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        cap = max(1e-9, (t1 - t0) * self.cpus)
        return {
            "busy": round((busy1 - busy0) / cap, 3),
            "others": round(max(0.0, (busy1 - busy0) - (own1 - own0)) / cap, 3),
        }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------- the service


def effective_settings(env: dict[str, str]) -> dict[str, Any] | None:
    """``gainrag settings`` under ``env``, secrets redacted (None if it fails)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gainrag.cli", "settings"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return None
    return _redact(json.loads(proc.stdout))


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if SECRET.search(key) and value not in (None, ""):
        return "<set>"
    return value


def wait_ready(url: str, timeout: float = 120.0) -> dict[str, Any]:
    """The body of ``GET /ready`` once it answers 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", timeout=5)
            if r.status_code == 200:
                try:
                    return dict(r.json())
                except ValueError:
                    return {}
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise SystemExit(f"{url}/ready did not answer 200 within {timeout:.0f} s: {last}")


def ask(client: httpx.Client, question: str, *, no_cache: bool) -> dict[str, Any]:
    headers = {"Cache-Control": "no-cache"} if no_cache else {}
    t = time.perf_counter()
    r = client.post("/answer", json={"question": question}, headers=headers)
    ms = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise SystemExit(f"/answer answered {r.status_code}: {r.text[:300]}")
    return {"ms": round(ms, 1), "cached": r.json().get("cached")}


# ------------------------------------------------------------------------------------ report


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}"


def _errors(by_error: dict[str, int]) -> str:
    return ", ".join(f"{n} × {s}" for s, n in by_error.items()) or "0"


def _cells(lv: dict[str, Any]) -> str:
    """The stream columns: citation, first token, inter-token, total (ms)."""
    t = lv["timings_ms"]
    stream = lv.get("stream")

    def pp(key: str, qs: tuple[str, ...]) -> str:
        return " / ".join(_fmt(t[key][q]) for q in qs) if stream or key == "total" else "–"

    return " | ".join(
        [
            pp("citation", ("p50", "p95")),
            pp("ttft", ("p50", "p95")),
            pp("itl", ("mean", "p50", "p95")),
            pp("total", ("p50", "p95", "p99")),
        ]
    )


STREAM_HEAD = "citation p50 / p95 | TTFT p50 / p95 | ITL mean / p50 / p95 | total p50 / p95 / p99"


def _load(lv: dict[str, Any]) -> str:
    cpu = lv.get("cpu") or {}
    return f"{cpu['busy']:.0%} / {cpu['others']:.0%}" if cpu else "–"


def to_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    params = res["params"]
    bound_ms = params["p95_bound_s"] * 1000
    load = res.get("load_average_start")
    cpus = report["machine"].get("cpus") or 1
    busy = load is not None and load[0] > 0.5 * cpus
    load_line = (
        "–"
        if load is None
        else f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min, {cpus} CPUs)"
        + (": **busy**, the machine is shared with other people's work" if busy else ": quiet")
    )
    mode = 'streamed (`"stream": true`)' if params.get("stream", True) else "not streamed"
    lines = [
        f"# /answer load test ({report['started']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {machine_line(report['machine'])}  ",
        f"Load average before the run: {load_line}  ",
        f"Service: {res['service']['where']}  ",
        f"Questions: {', '.join(f'`{q}`' for q in res['questions'])} (taken in turn)  ",
        f"Requests: {mode}",
        "",
        "Times are ms at the client, exact percentiles over the successful requests (a stream "
        "that ended in `done`): **citation** = to the `passages` event, **TTFT** = to the first "
        "`token` event, **ITL** = the gaps between consecutive `token` events (pooled over the "
        "requests; a token event is a piece of cleaned answer text, not one model token), "
        "**total** = to the end of the stream. answers/s counts successful answers; errors are "
        "by status and code (`stream <code>`: an `error` event after the citation). "
        "**CPU busy / others**: the machine's CPU use during the level, and the part of it not "
        "this run's (other people's processes).",
    ]
    for name, sc in res["scenarios"].items():
        cached = name == "cached"
        lines += ["", f"## {name}", "", sc["description"][0].upper() + sc["description"][1:] + "."]
        if sc["levels"]:
            last = "hit ratio" if cached else "service total p50"
            lines += [
                "",
                "Closed loop: each user sends its next request as soon as its last answer "
                "arrives (no think time), so concurrency = users; after a 429 a user waits the "
                "`Retry-After` (≤ 5 s).",
                "",
                "| users | elapsed s | requests | ok | errors by status | answers/s | hits "
                f"| {STREAM_HEAD} | {last} | CPU busy / others |",
                "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for lv in sc["levels"]:
                tail = (
                    _fmt(lv["hit_ratio"], 3)
                    if cached
                    else _fmt(lv.get("service_p50_ms", {}).get("total"))
                )
                lines.append(
                    f"| {lv['users']} | {lv['elapsed_s'] or lv['duration_s']:.0f} "
                    f"| {lv['requests']} | {lv['ok']} | {_errors(lv['failures_by_error'])} "
                    f"| {_fmt(lv['ok_rps'], 2)} | {lv['hits']} | {_cells(lv)} | {tail} "
                    f"| {_load(lv)} |"
                )
        if sc.get("rates"):
            lines += [
                "",
                f"Open loop: requests start every 1/rate s ({params['arrivals']}) for "
                f"{params['rate_duration_s']:.0f} s whether or not earlier ones finished; those "
                f"in flight then get {params['stop_timeout_s']:.0f} s to finish (the rest count "
                "as `unfinished`). **late p95**: how late the load generator started requests "
                "against the schedule. **p95 with errors**: the p95 total over all requests, a "
                f"failed one counting as slower than any bound; ✓ = under {_fmt(bound_ms)} ms.",
                "",
                "| arrivals/s | requests | late p95 | ok | errors by status | answers/s | hits "
                f"| {STREAM_HEAD} | p95 with errors | CPU busy / others |",
                "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for rt in sc["rates"]:
                p95e = rt["p95_total_with_errors_ms"]
                mark = " ✓" if p95e <= bound_ms else ""
                lines.append(
                    f"| {rt['rate']:g} | {rt['requests']} | {_fmt(rt['start_lag_ms']['p95'])} "
                    f"| {rt['ok']} | {_errors(rt['failures_by_error'])} "
                    f"| {_fmt(rt['ok_rps'], 2)} | {rt['hits']} | {_cells(rt)} "
                    f"| {_fmt(p95e)}{mark} | {_load(rt)} |"
                )
            lines += ["", knee_sentence(sc, params)]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "![latency against arrival rate and concurrency](loadtest.png)", ""]
    return "\n".join(lines)


def knee_sentence(sc: dict[str, Any], params: dict[str, Any]) -> str:
    rates = [rt["rate"] for rt in sc["rates"]]
    bound = f"{params['p95_bound_s']:g} s"
    k = sc.get("knee_rate")
    if k is None:
        return (
            f"**Knee: below {min(rates):g} requests/s**: already the lowest rate measured had a "
            f"p95 total (errors counting as over the bound) above {bound}."
        )
    if k == max(rates):
        return (
            f"**Knee: at least {k:g} requests/s**: every rate measured kept its p95 total "
            f"(errors counting as over the bound) under {bound}; try higher rates."
        )
    nxt = min(r for r in rates if r > k)
    return (
        f"**Knee: {k:g} requests/s**, the highest arrival rate whose p95 total (errors counting "
        f"as over the bound) stayed under {bound}, as did every lower rate; at {nxt:g}/s it did "
        "not."
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles against the arrival rate (open loop, with the bound and the knee) and
    against concurrency (closed loop); throughput against both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (ax_rate, ax_rate_rps), (ax_lat, ax_rps) = axes
    colors = {"uncached": "tab:red", "mixed": "tab:purple", "cached": "tab:blue"}
    series = {"citation": "tab:green", "ttft": "tab:orange", "total": "tab:red"}
    params = report["results"]["params"]

    def line(ax: Any, xs: list[float], ys: list[float | None], style: str, **kw: Any) -> None:
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y and math.isfinite(y)]
        if pts:  # log axes: no zeros
            ax.plot(*zip(*pts, strict=True), style, **kw)

    all_users: set[int] = set()
    all_rates: set[float] = set()
    for name, sc in report["results"]["scenarios"].items():
        color = colors.get(name)
        levels = sc["levels"]
        users = [lv["users"] for lv in levels]
        all_users.update(users)
        for p, style, mk in (("p50", "-", "o"), ("p95", "--", "^")):
            ys = [lv["timings_ms"]["total"][p] for lv in levels]
            line(ax_lat, users, ys, style, marker=mk, color=color, label=f"{name} total {p}")
        if levels and levels[0].get("stream") and name != "cached":
            ys = [lv["timings_ms"]["ttft"]["p50"] for lv in levels]
            line(ax_lat, users, ys, ":", marker=".", color=color, label=f"{name} TTFT p50")
        ys = [lv["ok_rps"] for lv in levels]
        line(ax_rps, users, ys, "-", marker="o", color=color, label=f"{name}: answers/s")
        ys = [lv["failures"] / lv["elapsed_s"] if lv["elapsed_s"] else None for lv in levels]
        line(ax_rps, users, ys, ":", marker="x", color=color, label=f"{name}: errors/s")
        rates = sc.get("rates") or []
        if not rates:
            continue
        xs = [rt["rate"] for rt in rates]
        all_rates.update(xs)
        keys = ("citation", "ttft", "total") if rates[0].get("stream") else ("total",)
        for key in keys:
            for p, style, mk in (("p50", "-", "o"), ("p95", "--", "^")):
                ys = [rt["timings_ms"][key][p] for rt in rates]
                line(ax_rate, xs, ys, style, marker=mk, color=series[key], label=f"{key} {p}")
        ax_rate.axhline(params["p95_bound_s"] * 1000, color="k", lw=0.8, ls="-.")
        ax_rate.annotate(
            f"p95 bound {params['p95_bound_s']:g} s",
            (min(xs), params["p95_bound_s"] * 1000),
            textcoords="offset points",
            xytext=(2, 4),
            fontsize=8,
        )
        if sc.get("knee_rate") is not None:
            ax_rate.axvline(sc["knee_rate"], color="tab:gray", lw=1.5, alpha=0.6)
            ax_rate.annotate(
                f"knee {sc['knee_rate']:g}/s",
                (sc["knee_rate"], params["p95_bound_s"] * 1000),
                textcoords="offset points",
                xytext=(4, -14),
                fontsize=8,
            )
        ax_rate.set_title(f"open loop ({name}): latency percentiles against the arrival rate")
        line(ax_rate_rps, xs, xs, "-", color="k", lw=0.8, label="offered (arrivals/s)")
        ys = [rt["ok_rps"] for rt in rates]
        line(ax_rate_rps, xs, ys, "-", marker="o", color=color, label="answers/s")
        ys = [rt["failures"] / rt["elapsed_s"] if rt["elapsed_s"] else None for rt in rates]
        line(ax_rate_rps, xs, ys, ":", marker="x", color=color, label="errors/s")
    # Arrival rates on a linear axis: the latency's turn upwards at the knee is the shape to see.
    for ax, ticks, label, xlog, ylog in (
        (ax_rate, sorted(all_rates), "arrival rate, requests/s (open loop)", False, True),
        (ax_rate_rps, sorted(all_rates), "arrival rate, requests/s (open loop)", False, False),
        (ax_lat, sorted(all_users), "concurrent users (closed loop)", True, True),
        (ax_rps, sorted(all_users), "concurrent users (closed loop)", True, True),
    ):
        ax.set_xscale("log" if xlog else "linear")
        ax.set_yscale("log" if ylog else "linear")
        if ticks:
            ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_rate.set_ylabel("ms, successful requests")
    ax_rate_rps.set_ylabel("per second")
    ax_rate_rps.set_title("open loop: offered, answered and failed per second")
    ax_lat.set_ylabel("ms, successful requests")
    ax_lat.set_title("closed loop: latency percentiles")
    ax_rps.set_ylabel("per second")
    ax_rps.set_title("closed loop: successful answers and errors per second")
    fig.suptitle(f"POST /answer — {machine_line(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """inf and NaN as strings: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"loadtest.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    paths["md"].write_text(to_markdown(report))
    plot(report, paths["png"])
    return paths


def _rel(p: Path) -> Path:
    """``p`` relative to the repository when it is inside it."""
    p = p.resolve()
    return p.relative_to(ROOT) if p.is_relative_to(ROOT) else p


# -------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = load_average()  # before this run adds its own
    meter = CpuMeter()
    notes: list[str] = []
    service: dict[str, Any] = {}
    scenarios: dict[str, Any] = {}
    main_name = "mixed" if args.cache_hit_ratio > 0 else "uncached"
    print(f"load test: work files in {work}; load average {load_start}", flush=True)

    with contextlib.ExitStack() as stack:
        url = args.url.rstrip("/") if args.url else None
        if url is None:
            redis = stack.enter_context(redis_service(work))
            env = {k: v for k, v in os.environ.items() if k.startswith("GAINRAG_")}
            env["GAINRAG_REDIS__URL"] = f"{redis.url}/0"
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
                env[name] = os.environ.get(name, "1")
            env["TOKENIZERS_PARALLELISM"] = os.environ.get("TOKENIZERS_PARALLELISM", "false")
            settings = effective_settings(env)
            index_dir = Path(((settings or {}).get("retrieval") or {}).get("index_dir") or "")
            if settings and not (index_dir / "index.faiss").exists():
                raise SystemExit(
                    f"no index in {index_dir}: run `make prepare` first, or pass --url"
                )
            print("starting the embedded service (models load in the background)...", flush=True)
            # Models load in minutes on a busy 2-core machine; a failure raises with the log tail.
            serve = gainrag_service("service", ["serve"], work, env, timeout_s=600)
            url = stack.enter_context(serve).url
            service = {
                "where": "embedded: `gainrag serve` started by this script on this machine, with "
                "a private redis-server (load generator and service share the CPUs)",
                "env": _redact({k: v for k, v in env.items() if k.startswith("GAINRAG_")}),
                "settings": settings,
            }
        else:
            service = {"where": f"remote at {url} (machine below is the load generator's)"}
        service["ready"] = wait_ready(url)
        service["url"] = url
        n = max(args.limit, args.cached_set)
        # The locustfile builds the same pool from the same files, so the pre-warmed questions
        # here are the ones its cache hits repeat.
        lists = [
            [r["question"] for r in load_questions(p, n, answers=False)] for p in args.questions
        ]
        pool = question_pool(lists, n)
        common = {
            "LOADTEST_QUESTIONS": os.pathsep.join(str(p) for p in args.questions),
            "LOADTEST_LIMIT": str(args.limit),
            "LOADTEST_WARM": str(args.cached_set),
            "LOADTEST_SEED": str(args.seed),
            "LOADTEST_STREAM": "1" if args.stream else "0",
        }
        with httpx.Client(base_url=url, timeout=600) as client:
            warm = ask(client, pool[0], no_cache=True)
            print(f"warm-up: {warm['ms']:.0f} ms", flush=True)
            service["warmup_ms"] = warm["ms"]
            prewarm_ms: float | None = None
            for scenario in args.scenarios:
                cached = scenario == "cached"
                name = "cached" if cached else main_name
                ratio = 1.0 if cached else args.cache_hit_ratio
                duration = args.cached_duration if cached else args.duration
                sc: dict[str, Any] = {
                    "description": SCENARIOS[name].format(ratio=ratio, warm=args.cached_set),
                    "cache_hit_ratio": ratio,
                    "questions": min(len(pool), args.limit),
                    "prewarmed": args.cached_set if ratio > 0 else 0,
                    "levels": [],
                }
                if ratio > 0 and prewarm_ms is None:
                    pre = [ask(client, q, no_cache=False) for q in pool[: args.cached_set]]
                    prewarm_ms = round(sum(p["ms"] for p in pre), 1)
                    sc["prewarm_ms"] = prewarm_ms
                    print(f"pre-warmed {len(pre)} questions in {prewarm_ms:.0f} ms", flush=True)
                env_extra = {**common, "LOADTEST_SCENARIO": scenario}
                env_extra["LOADTEST_HIT_RATIO"] = str(ratio)
                for users in args.levels:
                    prefix = work / f"{name}_u{users}"
                    print(f"{name}: {users} users for {duration:.0f} s...", flush=True)
                    meter.lap()
                    load = load_average()
                    run_locust(
                        url,
                        prefix,
                        env_extra,
                        users=users,
                        run_time=duration,
                        stop_timeout=args.stop_timeout,
                    )
                    lv = level_result(prefix, name, users, duration)
                    lv.update(load_average_start=load, cpu=meter.lap())
                    sc["levels"].append(lv)
                    print("  " + _progress(lv), flush=True)
                if not cached and args.rates:
                    sc["rates"] = []
                    for rate in args.rates:
                        prefix = work / f"{name}_r{rate:g}"
                        print(f"{name}: {rate:g} arrivals/s for {args.rate_duration:.0f} s...")
                        meter.lap()
                        load = load_average()
                        open_env = {
                            **env_extra,
                            "LOADTEST_RATE": repr(rate),
                            "LOADTEST_DURATION_S": repr(args.rate_duration),
                            "LOADTEST_ARRIVALS": args.arrivals,
                            "LOADTEST_DRAIN_S": repr(args.stop_timeout),
                        }
                        # The arrival process ends the run itself (schedule, then drain); the
                        # run time is only a backstop.
                        run_locust(
                            url,
                            prefix,
                            open_env,
                            users=1,
                            run_time=args.rate_duration + args.stop_timeout + 60,
                            stop_timeout=30,
                        )
                        rt = rate_result(prefix, name, rate, args.rate_duration)
                        rt.update(load_average_start=load, cpu=meter.lap())
                        sc["rates"].append(rt)
                        print("  " + _progress(rt), flush=True)
                    points = [(rt["rate"], rt["p95_total_with_errors_ms"]) for rt in sc["rates"]]
                    sc["knee_rate"] = knee(points, args.p95_bound_s * 1000)
                scenarios[name] = sc

    if args.url is None:
        notes.append("Locust and the service ran on the same machine and shared its CPUs.")
    max_in_flight = ((service.get("settings") or {}).get("api") or {}).get("max_in_flight", 32)
    if max(args.levels) > max_in_flight:
        notes.append(
            "Levels above GAINRAG_API__MAX_IN_FLIGHT get 429 for the requests over the limit; "
            "those users back off for Retry-After and are counted under errors."
        )
    notes.append(
        "A closed-loop level's requests include those still in flight when its duration ended "
        f"(each was given up to {args.stop_timeout:.0f} s to finish); at high concurrency with "
        "slow answers a level is dominated by its first wave, so lengthen --duration for steady "
        "state."
    )
    if args.rates:
        notes.append(
            "Open loop above the service's capacity: the queue grows for as long as arrivals "
            "last, so the latency at such a rate depends on --rate-duration; the knee is where "
            "it stops being bounded."
        )
    report = {
        "benchmark": "loadtest",
        "started": started,
        "command": " ".join(["python -m loadtests.run", *argv]),
        "machine": machine_info(),
        "results": {
            "service": service,
            "questions": [str(_rel(p)) for p in args.questions],
            "load_average_start": load_start,
            "params": {
                "levels": args.levels,
                "duration_s": args.duration,
                "cached_duration_s": args.cached_duration,
                "rates": args.rates,
                "rate_duration_s": args.rate_duration,
                "arrivals": args.arrivals,
                "cache_hit_ratio": args.cache_hit_ratio,
                "stream": args.stream,
                "p95_bound_s": args.p95_bound_s,
                "limit": args.limit,
                "cached_set": args.cached_set,
                "stop_timeout_s": args.stop_timeout,
                "seed": args.seed,
                "work_dir": str(_rel(work)),
            },
            "scenarios": scenarios,
        },
        "notes": notes,
    }
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def _progress(lv: dict[str, Any]) -> str:
    t = lv["timings_ms"]
    return (
        f"{lv['requests']} requests, {lv['ok']} ok, errors {_errors(lv['failures_by_error'])}, "
        f"{lv['ok_rps']:.2f} answers/s, citation p50 {_fmt(t['citation']['p50'])}, TTFT p50 "
        f"{_fmt(t['ttft']['p50'])}, total p50/p95 {_fmt(t['total']['p50'])}/"
        f"{_fmt(t['total']['p95'])} ms"
    )


if __name__ == "__main__":
    main()
