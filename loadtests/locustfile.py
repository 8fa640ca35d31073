"""Locust load test of ``POST /answer``: closed-loop users asking questions from a JSONL file.

Run by ``loadtests/run.py`` (``make loadtest``), or by hand::

    LOADTEST_SCENARIO=uncached .venv/bin/python -m locust -f loadtests/locustfile.py \\
        --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000

Environment:

``LOADTEST_SCENARIO``   ``uncached`` (default): every request sends ``Cache-Control: no-cache``, so
                        the service recomputes the pseudo-passage and the answer. ``cached``: the
                        questions are the first ``LOADTEST_LIMIT`` (default 20) of the file, which
                        the runner answers once beforehand, so nearly every request is a cache hit.
``LOADTEST_QUESTIONS``  JSONL file with a ``question`` field (default data/questions/nq_dev.jsonl).
``LOADTEST_LIMIT``      questions drawn from (default 200 uncached, 20 cached).
``LOADTEST_SEED``       base seed; user *i* draws with ``random.Random(seed + i)`` (default 0).
``LOADTEST_TIMEOUT_S``  per-request timeout (default 600).
``LOADTEST_BACKOFF_S``  after a 429, wait the response's ``Retry-After`` (capped at this many
                        seconds, default 5; 0 = retry at once) before the user's next request.
``LOADTEST_SAMPLES``    if set, one JSON line per request is appended to this file: latency,
                        status, cache hit and the service's ``timings_ms``.

Requests are named by outcome so that Locust's statistics separate them: ``/answer`` is a 200 of
the scenario's kind (a computed answer when uncached, a cache hit when cached; the
``cached`` field, else the ``X-Cache`` header), ``/answer (miss)`` a 200 computed in the cached
scenario (``/answer (hit)`` a hit in the uncached one), ``/answer (error)`` any other status.
Failures are reported as ``HTTP <status> <code>`` (``HTTP 0 <exception>`` when no response came),
which the runner groups by status.

Locust rewrites ``<csv prefix>_stats.csv`` only once a second, so its last version can miss the
final second; at exit this file also writes ``<prefix>_final_stats.csv`` and
``<prefix>_final_failures.csv`` (same format) from the final statistics, which the runner reads.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import gevent
from locust import HttpUser, events, task
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

# The light module (no pydantic settings, no models): every Locust process imports this file.
from gainrag.evaluation.questions import load_questions

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = ("uncached", "cached")
SCENARIO = os.environ.get("LOADTEST_SCENARIO", "uncached")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"LOADTEST_SCENARIO must be one of {SCENARIOS}, got {SCENARIO!r}")
QUESTIONS_PATH = Path(
    os.environ.get("LOADTEST_QUESTIONS", ROOT / "data" / "questions" / "nq_dev.jsonl")
)
LIMIT = int(os.environ.get("LOADTEST_LIMIT", "20" if SCENARIO == "cached" else "200"))
SEED = int(os.environ.get("LOADTEST_SEED", "0"))
TIMEOUT_S = float(os.environ.get("LOADTEST_TIMEOUT_S", "600"))
BACKOFF_S = float(os.environ.get("LOADTEST_BACKOFF_S", "5"))
SAMPLES = os.environ.get("LOADTEST_SAMPLES")


QUESTIONS = [r["question"] for r in load_questions(QUESTIONS_PATH, LIMIT, answers=False)]
if not QUESTIONS:
    raise SystemExit(f"no questions in {QUESTIONS_PATH}")
_user_ids = itertools.count()
_samples = open(SAMPLES, "a", buffering=1) if SAMPLES else None  # noqa: SIM115 (process-long)


_environment: Environment | None = None
EXPECTED = "/answer"
UNEXPECTED = "/answer (miss)" if SCENARIO == "cached" else "/answer (hit)"


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    global _environment
    _environment = environment
    # gevent's loop has not run since Locust imported gevent, so its clock lags by the start-up
    # time (seconds on a loaded machine) and --run-time, timed from it, would end that much early.
    gevent.get_hub().loop.update_now()


@events.quit.add_listener
def _write_final_csv(**_kw: Any) -> None:
    """The final statistics in Locust's CSV format (its own files may lag by a second)."""
    env = _environment
    prefix = getattr(getattr(env, "parsed_options", None), "csv_prefix", None)
    if env is None or not prefix:
        return
    writer = StatsCSV(env, PERCENTILES_TO_REPORT)
    for kind, write in (("stats", writer.requests_csv), ("failures", writer.failures_csv)):
        with open(f"{prefix}_final_{kind}.csv", "w", newline="") as f:
            write(csv.writer(f))
    if _samples is not None:
        _samples.flush()


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 1)))
    except (TypeError, ValueError):
        return 1.0


class AnswerUser(HttpUser):
    """One closed-loop client: the next question is sent as soon as the last answer arrives."""

    def wait_time(self) -> float:  # type: ignore[override]
        # No think time; only after a 429 does the user honour Retry-After (capped), so that
        # rejected users do not spin on the shared CPU.
        pause, self._pause = self._pause, 0.0
        return pause

    def on_start(self) -> None:
        self._pause = 0.0
        self.rng = random.Random(SEED + next(_user_ids))
        self.headers = {"Cache-Control": "no-cache"} if SCENARIO == "uncached" else {}

    @task
    def answer(self) -> None:
        question = self.rng.choice(QUESTIONS)
        with self.client.post(
            "/answer",
            json={"question": question},
            headers=self.headers,
            timeout=TIMEOUT_S,
            name="/answer",
            catch_response=True,
        ) as r:
            meta = r.request_meta
            status = r.status_code
            hit: bool | None = None
            timings: dict[str, float] | None = None
            if status == 200:
                try:
                    body = r.json()
                    hit = bool(body.get("cached", r.headers.get("X-Cache") == "HIT"))
                    timings = body.get("timings_ms")
                except ValueError:
                    r.failure("HTTP 200 invalid_json_body")
                    meta["name"] = "/answer (error)"
                else:
                    meta["name"] = EXPECTED if hit == (SCENARIO == "cached") else UNEXPECTED
                    r.success()
            else:
                meta["name"] = "/answer (error)"
                code = ""
                if status:
                    try:
                        code = r.json()["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "unknown"
                else:
                    code = type(r.error).__name__ if r.error is not None else "no_response"
                r.failure(f"HTTP {status} {code}")
                if status == 429 and BACKOFF_S > 0:
                    self._pause = min(_retry_after(r.headers), BACKOFF_S)
            if _samples is not None:
                row = {
                    "t": meta.get("start_time", time.time()),
                    "ms": meta["response_time"],
                    "status": status,
                    "cached": hit,
                    "timings_ms": timings,
                }
                _samples.write(json.dumps(row) + "\n")
