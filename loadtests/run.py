"""Concurrency sweep of ``POST /answer`` with Locust, headless (``make loadtest``).

For every scenario (``uncached``, ``cached``) and every concurrency level, runs
``python -m locust -f loadtests/locustfile.py --headless -u N -r N -t Ds`` as a child process
against ``--url`` (or against an embedded service it starts itself, with a private redis-server
for the answer cache), parses Locust's CSV files and writes ``loadtest.json``, ``loadtest.md``
and ``loadtest.png`` (latency percentiles and throughput against concurrency) to ``--out``.

Users are closed-loop with no think time, so the concurrency is the number of users. Latency
percentiles are over successful requests (HTTP 200 of the scenario's kind) and come from Locust,
which rounds response times (2 significant digits above 100 ms) before taking percentiles; the
JSON also carries exact percentiles from the per-request samples the locustfile writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
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

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
SCENARIOS = {
    "uncached": "every request sends `Cache-Control: no-cache`: the service recomputes the "
    "pseudo-passage and the answer (cache reads skipped)",
    "cached": "questions from a small set answered once beforehand: nearly every request is "
    "answered from the Redis answer cache",
}
STAGES = ("retrieve", "pseudo", "select", "generate", "total")
OK_NAME = "/answer"  # 200s of the scenario's kind (the locustfile's naming)
# 200s of the other kind: computed in the cached scenario, a cache hit in the uncached one
OTHER_NAME = {"cached": "/answer (miss)", "uncached": "/answer (hit)"}
SMOKE = {"levels": "1,2", "duration": 20.0, "cached_duration": 5.0, "limit": 10, "cached_set": 5}
DEFAULTS = {"levels": "1,4,16,64", "duration": 90.0, "cached_duration": 20.0, "limit": 200}
DEFAULTS["cached_set"] = 20
SECRET = re.compile(r"(^|_)(key|token|password|secret)$", re.I)  # setting names, not values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="load-test a running service (default: start one here)")
    ap.add_argument("--levels", help=f"concurrency levels (default {DEFAULTS['levels']})")
    ap.add_argument(
        "--duration",
        type=float,
        help=f"seconds per uncached level (default {DEFAULTS['duration']:.0f})",
    )
    ap.add_argument(
        "--cached-duration",
        type=float,
        help=f"seconds per cached level (default {DEFAULTS['cached_duration']:.0f})",
    )
    ap.add_argument("--scenarios", default="uncached,cached", help="uncached,cached")
    ap.add_argument("--questions", type=Path, default=ROOT / "data/questions/nq_dev.jsonl")
    ap.add_argument(
        "--limit", type=int, help=f"questions drawn from, uncached (default {DEFAULTS['limit']})"
    )
    ap.add_argument(
        "--cached-set",
        type=int,
        help=f"questions pre-warmed and drawn from, cached (default {DEFAULTS['cached_set']})",
    )
    ap.add_argument(
        "--stop-timeout",
        type=float,
        default=150.0,
        help="after the duration, let requests in flight finish for up to this long (default "
        "150 s, above the service's 120 s pipeline deadline) so slow answers are counted",
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
        help="tiny run: levels 1,2, 20 s (5 s cached), 10 questions, 5 cached",
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
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        ap.error(f"--scenarios takes {','.join(SCENARIOS)}, got {unknown or 'nothing'}")
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


_HTTP_ERROR = re.compile(r"HTTP (\d+)(?: (\S+))?")


def parse_failures_csv(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Failures of Locust's ``*_failures.csv`` by HTTP status ("0": no response) and by error."""
    by_status: Counter[str] = Counter()
    by_error: Counter[str] = Counter()
    if not path.exists():
        return {}, {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            n = int(row["Occurrences"])
            m = _HTTP_ERROR.search(row["Error"])
            status = m.group(1) if m else "0"
            by_status[status] += n
            by_error[f"{status} {m.group(2) or ''}".strip() if m else row["Error"]] += n
    return dict(sorted(by_status.items())), dict(sorted(by_error.items()))


def summarize_samples(path: Path, scenario: str) -> dict[str, Any]:
    """Exact latency percentiles of the 200s of the scenario's kind, and the service's median
    stage timings of the computed (not cached) answers, from the locustfile's samples."""
    rows = []
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    want_hit = scenario == "cached"
    ok = [r for r in rows if r["status"] == 200 and bool(r.get("cached")) == want_hit]
    ms = [float(r["ms"]) for r in ok]
    out: dict[str, Any] = {
        "n": len(ok),
        "latency_ms": {
            "p50": percentile(ms, 50) if ms else None,
            "p95": percentile(ms, 95) if ms else None,
            "p99": percentile(ms, 99) if ms else None,
            "mean": sum(ms) / len(ms) if ms else None,
        },
    }
    computed = [
        r["timings_ms"]
        for r in rows
        if r["status"] == 200 and not r.get("cached") and r.get("timings_ms")
    ]
    if computed:
        out["service_p50_ms"] = {
            s: percentile([float(t[s]) for t in computed if s in t], 50) for s in STAGES
        }
    return out


def level_result(prefix: Path, scenario: str, users: int, duration: float) -> dict[str, Any]:
    """One level's figures from Locust's CSV files (``<prefix>_final_stats.csv``, written by the
    locustfile at exit, else Locust's own ``<prefix>_stats.csv``) and the samples."""
    final = Path(f"{prefix}_final_stats.csv")
    stats_path = final if final.exists() else Path(f"{prefix}_stats.csv")
    if not stats_path.exists():
        raise SystemExit(f"Locust wrote no {stats_path}; see {prefix}_locust.log")
    failures_path = Path(
        f"{prefix}_final_failures.csv" if final.exists() else f"{prefix}_failures.csv"
    )
    rows = parse_stats_csv(stats_path)
    agg = rows.get("Aggregated") or {"requests": 0, "failures": 0, "rps": 0.0}
    ok = rows.get(OK_NAME) or {"requests": 0, "rps": 0.0}
    other = rows.get(OTHER_NAME[scenario]) or {"requests": 0, "rps": 0.0}
    by_status, by_error = parse_failures_csv(failures_path)
    samples = summarize_samples(Path(f"{prefix}_samples.jsonl"), scenario)
    hits, misses = (ok, other) if scenario == "cached" else (other, ok)
    n_ok = ok["requests"] + other["requests"]
    result: dict[str, Any] = {
        "users": users,
        "duration_s": duration,
        "elapsed_s": round(agg["requests"] / agg["rps"], 1) if agg["rps"] else None,
        "requests": agg["requests"],
        "ok": n_ok,
        "failures": agg["failures"],
        "failures_by_status": by_status,
        "failures_by_error": by_error,
        "rps": agg["rps"],
        "ok_rps": ok["rps"] + other["rps"],
        "latency_ms": {k: ok.get(k) for k in ("p50", "p95", "p99", "mean", "max")},
        "latency_all_ms": {k: agg.get(k) for k in ("p50", "p95", "p99")},
        "exact_latency_ms": samples["latency_ms"],
        "hits": hits["requests"],
        "misses": misses["requests"],
        "hit_ratio": round(hits["requests"] / n_ok, 4) if n_ok else None,
        "locust_csv": str(_rel(stats_path)),
    }
    if "service_p50_ms" in samples:
        result["service_p50_ms"] = samples["service_p50_ms"]
    return result


def run_locust(
    url: str,
    scenario: str,
    users: int,
    duration: float,
    prefix: Path,
    *,
    questions: Path,
    limit: int,
    seed: int,
    stop_timeout: float,
) -> None:
    """One headless Locust run; its stats land in ``<prefix>_*.csv``."""
    for old in prefix.parent.glob(f"{prefix.name}_*"):
        old.unlink()
    env = {
        **os.environ,
        "LOADTEST_SCENARIO": scenario,
        "LOADTEST_QUESTIONS": str(questions),
        "LOADTEST_LIMIT": str(limit),
        "LOADTEST_SEED": str(seed),
        "LOADTEST_SAMPLES": f"{prefix}_samples.jsonl",
    }
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{max(1, round(duration))}s",
        "--stop-timeout",
        f"{max(0, round(stop_timeout))}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--only-summary",
        "--exit-code-on-error",
        "0",
    ]
    with open(f"{prefix}_locust.log", "wb") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"locust exited with {rc}; see {prefix}_locust.log")


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
    return "–" if value is None else f"{value:,.{digits}f}"


def _errors(by_status: dict[str, int]) -> str:
    return ", ".join(f"{n} × {s}" for s, n in by_status.items()) or "0"


def to_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    lines = [
        f"# /answer load test ({report['started']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {machine_line(report['machine'])}  ",
        f"Service: {res['service']['where']}  ",
        f"Questions: `{res['questions']}`",
        "",
        "Closed loop: each user sends its next request as soon as its last answer arrives (no "
        "think time), so concurrency = users; after a 429 a user waits the `Retry-After` "
        "(≤ 5 s). Latencies are of successful requests; Locust rounds response times to 2 "
        "significant digits above 100 ms before taking percentiles (exact ones are in the "
        "JSON). req/s counts successful answers.",
    ]
    for name, sc in res["scenarios"].items():
        cached = name == "cached"
        last = "hit ratio" if cached else "service total p50 ms"
        lines += [
            "",
            f"## {name}",
            "",
            sc["description"][0].upper() + sc["description"][1:] + ".",
            "",
            "| users | elapsed s | requests | ok | errors by status | req/s "
            f"| p50 ms | p95 ms | p99 ms | {last} |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for lv in sc["levels"]:
            lat = lv["latency_ms"]
            if cached:
                tail = _fmt(lv["hit_ratio"], 3)
            else:
                tail = _fmt(lv.get("service_p50_ms", {}).get("total"))
            lines.append(
                f"| {lv['users']} | {lv['elapsed_s'] or lv['duration_s']:.0f} | {lv['requests']} "
                f"| {lv['ok']} | {_errors(lv['failures_by_status'])} | {_fmt(lv['ok_rps'], 2)} "
                f"| {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {tail} |"
            )
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "![latency and throughput against concurrency](loadtest.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles and throughput against concurrency (log axes), both scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_lat, ax_rps) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"uncached": "tab:red", "cached": "tab:blue"}
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    all_users: set[int] = set()

    def line(ax: Any, xs: list[int], ys: list[float | None], style: str, **kw: Any) -> None:
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y]  # log axes: no zeros
        if pts:
            ax.plot(*zip(*pts, strict=True), style, **kw)

    for name, sc in report["results"]["scenarios"].items():
        levels = sc["levels"]
        users = [lv["users"] for lv in levels]
        all_users.update(users)
        color = colors.get(name)
        for p, style in styles.items():
            ys = [lv["latency_ms"][p] for lv in levels]
            line(ax_lat, users, ys, style, marker="o", color=color, label=f"{name} {p}")
        ys = [lv["ok_rps"] for lv in levels]
        line(ax_rps, users, ys, "-", marker="o", color=color, label=f"{name}: answers/s")
        ys = [lv["failures"] / lv["elapsed_s"] if lv["elapsed_s"] else None for lv in levels]
        line(ax_rps, users, ys, ":", marker="x", color=color, label=f"{name}: errors/s")
    for ax in (ax_lat, ax_rps):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(all_users))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent users (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_lat.set_ylabel("latency of successful requests (ms)")
    ax_lat.set_title("latency percentiles (Locust, rounded)")
    ax_rps.set_ylabel("per second")
    ax_rps.set_title("throughput: successful answers and errors")
    fig.suptitle(f"POST /answer — {machine_line(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"loadtest.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
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
    notes: list[str] = []
    service: dict[str, Any] = {}
    scenarios: dict[str, Any] = {}
    print(f"load test: work files in {work}", flush=True)

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
        with httpx.Client(base_url=url, timeout=600) as client:
            rows = load_questions(args.questions, max(args.limit, args.cached_set), answers=False)
            qs = [r["question"] for r in rows]
            warm = ask(client, qs[0], no_cache=True)
            print(f"warm-up: {warm['ms']:.0f} ms", flush=True)
            service["warmup_ms"] = warm["ms"]
            for scenario in args.scenarios:
                cached = scenario == "cached"
                limit = args.cached_set if cached else args.limit
                duration = args.cached_duration if cached else args.duration
                sc: dict[str, Any] = {
                    "description": SCENARIOS[scenario],
                    "questions": len(qs[:limit]),
                    "levels": [],
                }
                if cached:
                    # The locustfile draws from the same first `limit` questions of the file.
                    pre = [ask(client, q, no_cache=False) for q in qs[:limit]]
                    sc["prewarm_ms"] = round(sum(p["ms"] for p in pre), 1)
                    print(
                        f"pre-warmed {len(pre)} questions in {sc['prewarm_ms']:.0f} ms", flush=True
                    )
                for users in args.levels:
                    prefix = work / f"{scenario}_u{users}"
                    print(f"{scenario}: {users} users for {duration:.0f} s...", flush=True)
                    run_locust(
                        url,
                        scenario,
                        users,
                        duration,
                        prefix,
                        questions=args.questions,
                        limit=limit,
                        seed=args.seed,
                        stop_timeout=args.stop_timeout,
                    )
                    lv = level_result(prefix, scenario, users, duration)
                    sc["levels"].append(lv)
                    print(
                        f"  {lv['requests']} requests, {lv['ok']} ok, errors "
                        f"{_errors(lv['failures_by_status'])}, {lv['ok_rps']:.2f} answers/s, "
                        f"p50/p95/p99 {_fmt(lv['latency_ms']['p50'])}/"
                        f"{_fmt(lv['latency_ms']['p95'])}/{_fmt(lv['latency_ms']['p99'])} ms",
                        flush=True,
                    )
                scenarios[scenario] = sc

    if args.url is None:
        notes.append("Locust and the service ran on the same machine and shared its CPUs.")
    max_in_flight = ((service.get("settings") or {}).get("api") or {}).get("max_in_flight", 32)
    if max(args.levels) > max_in_flight:
        notes.append(
            "Levels above GAINRAG_API__MAX_IN_FLIGHT get 429 for the requests over the limit; "
            "those users back off for Retry-After and are counted under errors."
        )
    notes.append(
        "A level's requests include those still in flight when its duration ended (each was "
        f"given up to {args.stop_timeout:.0f} s to finish); at high concurrency with slow "
        "answers a level is dominated by its first wave, so lengthen --duration for steady state."
    )
    report = {
        "benchmark": "loadtest",
        "started": started,
        "command": " ".join(["python", "loadtests/run.py", *argv]),
        "machine": machine_info(),
        "results": {
            "service": service,
            "questions": str(_rel(args.questions)),
            "params": {
                "levels": args.levels,
                "duration_s": args.duration,
                "cached_duration_s": args.cached_duration,
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


if __name__ == "__main__":
    main()
