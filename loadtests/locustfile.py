"""Locust load test of ``POST /answer``: closed-loop users, or an open-loop arrival process,
asking questions from the dev sets, streamed (Server-Sent Events) or not.

Run by ``python -m loadtests.run`` (``make loadtest``), or by hand from the repository root::

    LOADTEST_SCENARIO=uncached .venv/bin/python -m locust -f loadtests/locustfile.py \\
        --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000
    LOADTEST_RATE=0.2 LOADTEST_DURATION_S=120 .venv/bin/python -m locust \\
        -f loadtests/locustfile.py --headless -u 1 -t 400s --host http://127.0.0.1:8000

Environment:

``LOADTEST_SCENARIO``   ``uncached`` (default): a request repeats a pre-warmed question with
                        probability ``LOADTEST_HIT_RATIO`` (no header: a cache hit) and otherwise
                        sends ``Cache-Control: no-cache``, so the service recomputes the answer.
                        ``cached``: every request repeats a pre-warmed question.
``LOADTEST_QUESTIONS``  JSONL files with a ``question`` field, separated by ``:`` (default
                        data/questions/nq_dev.jsonl and squad_dev.jsonl, taken in turn).
``LOADTEST_LIMIT``      the pool computed answers are drawn from (default 200).
``LOADTEST_WARM``       the first this many of the pool are the pre-warmed questions that cache
                        hits repeat (default 20); the runner answers them once beforehand.
``LOADTEST_HIT_RATIO``  share of requests that repeat a pre-warmed question, uncached scenario
                        (default 0); exactly ``floor(n * ratio)`` of a user's first n requests.
``LOADTEST_STREAM``     ``1`` (default): ``"stream": true``, and the Server-Sent Events are timed
                        (the ``passages`` event, each ``token``, the end). ``0``: one JSON body.
``LOADTEST_RATE``       if set, the open loop: requests start at this rate (per second) for
                        ``LOADTEST_DURATION_S`` (default 60), ``uniform``ly spaced or as a
                        ``poisson`` process (``LOADTEST_ARRIVALS``), whether or not earlier ones
                        have finished; then those in flight get ``LOADTEST_DRAIN_S`` (default
                        150) to finish before the rest count as ``unfinished`` and Locust quits.
``LOADTEST_SEED``       base seed; user *i* draws with ``random.Random(seed + i)`` (default 0).
``LOADTEST_TIMEOUT_S``  per-request timeout (default 600).
``LOADTEST_BACKOFF_S``  closed loop: after a 429, wait the response's ``Retry-After`` (capped at
                        this many seconds, default 5; 0 = retry at once) before the next request.
``LOADTEST_SAMPLES``    if set, one JSON line per request is appended to this file (start time,
                        total ms, status, error, cache hit, the stream's timings, the service's
                        ``timings_ms``).

Requests are named by outcome in Locust's statistics: ``/answer`` (a 200 computed by the service),
``/answer (hit)`` (a 200 from the cache) and ``/answer (error)``, whose failure is its error
label: ``<status> <code>`` for an HTTP error, ``stream <code>`` for an ``error`` event after the
citation, ``stream truncated`` for a stream that ended without ``done``, ``0 <exception>`` when no
response came and ``unfinished`` for an open-loop request still running when the drain ended. A
streamed request's response time is its total (to the end of the stream).

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
import requests
from gevent.pool import Group
from locust import User, events, task
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

# The light module (no pydantic settings, no models): every Locust process imports this file.
from gainrag.evaluation.questions import load_questions
from loadtests.measure import SSEParser, arrival_times, is_hit, question_pool, stream_result

ROOT = Path(__file__).resolve().parents[1]
DEV_SETS = [ROOT / "data/questions/nq_dev.jsonl", ROOT / "data/questions/squad_dev.jsonl"]

SCENARIOS = ("uncached", "cached")
SCENARIO = os.environ.get("LOADTEST_SCENARIO", "uncached")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"LOADTEST_SCENARIO must be one of {SCENARIOS}, got {SCENARIO!r}")
_paths = os.environ.get("LOADTEST_QUESTIONS")
QUESTION_FILES = [Path(p) for p in _paths.split(os.pathsep)] if _paths else DEV_SETS
LIMIT = int(os.environ.get("LOADTEST_LIMIT", "200"))
WARM = int(os.environ.get("LOADTEST_WARM", "20"))
HIT_RATIO = 1.0 if SCENARIO == "cached" else float(os.environ.get("LOADTEST_HIT_RATIO", "0"))
STREAM = os.environ.get("LOADTEST_STREAM", "1") != "0"
_rate = os.environ.get("LOADTEST_RATE")
RATE = float(_rate) if _rate else None
DURATION_S = float(os.environ.get("LOADTEST_DURATION_S", "60"))
ARRIVAL_PROCESS = os.environ.get("LOADTEST_ARRIVALS", "uniform")
DRAIN_S = float(os.environ.get("LOADTEST_DRAIN_S", "150"))
SEED = int(os.environ.get("LOADTEST_SEED", "0"))
TIMEOUT_S = float(os.environ.get("LOADTEST_TIMEOUT_S", "600"))
BACKOFF_S = float(os.environ.get("LOADTEST_BACKOFF_S", "5"))
SAMPLES = os.environ.get("LOADTEST_SAMPLES")

_n = max(LIMIT, WARM)
POOL = question_pool(
    [[r["question"] for r in load_questions(p, _n, answers=False)] for p in QUESTION_FILES], _n
)
COMPUTED, WARMED = POOL[:LIMIT], POOL[:WARM]
if not COMPUTED or (HIT_RATIO > 0 and not WARMED):
    raise SystemExit(f"no questions in {QUESTION_FILES} (limit {LIMIT}, warm {WARM})")
_user_ids = itertools.count()
_samples = open(SAMPLES, "a", buffering=1) if SAMPLES else None  # noqa: SIM115 (process-long)
_environment: Environment | None = None


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


def _error_code(r: requests.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def ask(session: requests.Session, host: str, question: str, want_hit: bool) -> dict[str, Any]:
    """One ``POST /answer``: the sample row (``ms`` is the total, to the stream's end)."""
    headers = {} if want_hit else {"Cache-Control": "no-cache"}
    body: dict[str, Any] = {"question": question, **({"stream": True} if STREAM else {})}
    row: dict[str, Any] = {"t": time.time(), "question": question, "want_hit": want_hit}
    row["stream"] = STREAM
    row.update(status=0, ok=False, cached=None, error=None, timings_ms=None)
    start = time.perf_counter()
    try:
        r = session.post(
            f"{host}/answer", json=body, headers=headers, timeout=TIMEOUT_S, stream=STREAM
        )
    except requests.RequestException as exc:
        row.update(ms=(time.perf_counter() - start) * 1000, error=f"0 {type(exc).__name__}")
        return row
    with r:
        row["status"] = r.status_code
        if r.status_code != 200:
            row["error"] = f"{r.status_code} {_error_code(r)}"
            if r.status_code == 429:
                row["retry_after"] = _retry_after(r.headers)
        elif STREAM:
            parser, evs = SSEParser(), []
            try:
                # chunk_size None: each HTTP chunk as it arrives (the service sends one per event)
                for chunk in r.iter_content(chunk_size=None):
                    evs += parser.feed(chunk, time.perf_counter())
            except requests.RequestException:
                pass  # the stream broke: counted as truncated below
            res = stream_result(evs, start, time.perf_counter())
            row.update(
                ms=res.total_ms,
                ok=res.outcome == "done",
                cached=res.cached,
                timings_ms=res.timings_ms,
                citation_ms=res.citation_ms,
                ttft_ms=res.ttft_ms,
                gaps_ms=res.gaps_ms,
                tokens=res.tokens,
            )
            if res.outcome != "done":
                row["error"] = f"stream {res.error or 'truncated'}"
        else:
            try:
                answer = r.json()
                row.update(ok=True, cached=bool(answer["cached"]), timings_ms=answer["timings_ms"])
            except (ValueError, KeyError, TypeError):
                row["error"] = "200 invalid_json_body"
    row.setdefault("ms", (time.perf_counter() - start) * 1000)
    return row


def record(environment: Environment, row: dict[str, Any]) -> None:
    """One request into Locust's statistics (named by outcome) and the samples file."""
    name = "/answer (error)" if not row["ok"] else "/answer (hit)" if row["cached"] else "/answer"
    environment.events.request.fire(
        request_type="POST",
        name=name,
        response_time=row["ms"],
        response_length=0,
        response=None,
        context={},
        exception=row["error"],
        start_time=row["t"],
        url="/answer",
    )
    if _samples is not None:
        _samples.write(json.dumps({k: v for k, v in row.items() if k != "retry_after"}) + "\n")


class AnswerUser(User):
    """One closed-loop client: the next question is sent as soon as the last answer arrives."""

    abstract = RATE is not None  # LOADTEST_RATE selects the open loop instead
    _pause = 0.0

    def wait_time(self) -> float:
        # No think time; only after a 429 does the user honour Retry-After (capped), so that
        # rejected users do not spin on the shared CPU.
        pause, self._pause = self._pause, 0.0
        return pause

    def on_start(self) -> None:
        self._pause = 0.0
        self._asked = 0
        self.rng = random.Random(SEED + next(_user_ids))
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def answer(self) -> None:
        want_hit = is_hit(self._asked, HIT_RATIO)
        self._asked += 1
        question = self.rng.choice(WARMED if want_hit else COMPUTED)
        row = ask(self.session, str(self.host), question, want_hit)
        record(self.environment, row)
        if row["status"] == 429 and BACKOFF_S > 0:
            self._pause = min(row["retry_after"], BACKOFF_S)


class ArrivalUser(User):
    """The open loop: not a client but the arrival process, which starts each request in a
    greenlet of its own at its scheduled time.

    Why this design: a Locust user is a closed loop (its next task waits for its last), so
    ``constant_throughput`` users, or a load shape that sets how many users there are, still hold
    back arrivals while the service is slow, which hides exactly the queueing an open loop is
    meant to show. Here the schedule (``arrival_times``) is fixed before the level starts and one
    greenlet per request (a new HTTP session each, as a new visitor) costs a socket and a few KB,
    so arrivals never wait for completions; how late each one started (``lag_ms``) is recorded,
    in case the load generator itself falls behind on the shared CPUs.
    """

    abstract = RATE is None
    fixed_count = 1  # one arrival process whatever -u says

    def wait_time(self) -> float:
        # Only after the schedule ran (and Locust was asked to quit): wait to be stopped.
        return 3600.0

    @task
    def arrivals(self) -> None:
        assert RATE is not None
        schedule = arrival_times(RATE, DURATION_S, ARRIVAL_PROCESS, SEED)
        rng = random.Random(SEED)
        in_flight = Group()
        t0 = time.perf_counter()
        try:
            for i, offset in enumerate(schedule):
                gevent.sleep(max(0.0, t0 + offset - time.perf_counter()))
                want_hit = is_hit(i, HIT_RATIO)
                question = rng.choice(WARMED if want_hit else COMPUTED)
                in_flight.spawn(self._arrive, question, want_hit, offset, t0)
            in_flight.join(timeout=DRAIN_S)
        finally:
            # Each killed request records itself as unfinished (an error) before it goes.
            in_flight.kill(block=True, timeout=10)
        # Quit from another greenlet: stopping users from inside one of them would kill this one
        # in the middle of the quit.
        gevent.spawn(self.environment.runner.quit)

    def _arrive(self, question: str, want_hit: bool, offset: float, t0: float) -> None:
        lag_ms = (time.perf_counter() - t0 - offset) * 1000
        start, t = time.perf_counter(), time.time()
        row: dict[str, Any] | None = None
        with requests.Session() as session:
            try:
                row = ask(session, str(self.host), question, want_hit)
            except gevent.GreenletExit:
                row = {"t": t, "question": question, "want_hit": want_hit, "stream": STREAM}
                row.update(status=0, ok=False)
                row.update(cached=None, error="unfinished", timings_ms=None)
                row["ms"] = (time.perf_counter() - start) * 1000
                raise
            finally:
                if row is not None:
                    record(self.environment, {**row, "scheduled_s": offset, "lag_ms": lag_ms})
