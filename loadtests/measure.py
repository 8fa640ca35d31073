"""The load test's pure parts: what a streamed request measures, the open loop's arrival times,
the cache-hit mix, the question pool and the knee.

No Locust, gevent or HTTP here, so that the locustfile and the runner share one definition and the
tests check them on recorded bytes and exact numbers.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from gainrag.evaluation.qa_metrics import percentile

ARRIVALS = ("uniform", "poisson")

# ------------------------------------------------------------------------- Server-Sent Events

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One dispatched event and the time (the caller's clock, s) its last byte arrived."""

    name: str
    data: str
    t: float


class SSEParser:
    """Incremental Server-Sent Events parser (the WHATWG rules the service's events need).

    Bytes come in arbitrary chunks; an event is dispatched at the blank line that ends it and is
    stamped with the arrival time of the chunk that held that line. Lines end with CRLF, LF or
    CR; a CR at the end of a chunk waits for the next one (it may be half of a CRLF). ``:``
    lines are comments; ``data`` lines join with a newline; an event without data is dropped, as
    is an unterminated one at the end of the stream.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._name = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes, t: float) -> list[Event]:
        """The events that ``chunk`` (arrived at ``t``) completes."""
        self._buf += chunk
        out: list[Event] = []
        pos = 0
        while m := _EOL.search(self._buf, pos):
            if m.group() == b"\r" and m.end() == len(self._buf):
                break  # maybe the first half of a CRLF split across chunks
            line = self._buf[pos : m.start()].decode("utf-8", errors="replace")
            pos = m.end()
            if event := self._line(line, t):
                out.append(event)
        self._buf = self._buf[pos:]
        return out

    def _line(self, line: str, t: float) -> Event | None:
        if not line:
            event = Event(self._name or "message", "\n".join(self._data), t) if self._data else None
            self._name, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        return None


# ------------------------------------------------------------------------ one streamed request


@dataclass
class StreamResult:
    """What one streamed ``/answer`` measured, in ms from the request's start."""

    outcome: str
    """``done``, ``error`` (an ``error`` event) or ``truncated`` (the stream ended without
    either)."""
    total_ms: float
    citation_ms: float | None = None
    """To the ``passages`` event: the citation."""
    ttft_ms: float | None = None
    """To the first ``token`` event."""
    gaps_ms: list[float] = field(default_factory=list)
    """Between consecutive ``token`` events (inter-token latency)."""
    tokens: int = 0
    error: str | None = None
    """The ``error`` event's code."""
    cached: bool | None = None
    timings_ms: dict[str, float] | None = None
    """The service's own stage timings (``done``)."""


def _json(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stream_result(events: Iterable[Event], start: float, end: float) -> StreamResult:
    """The timings of one stream: ``events`` as parsed, ``start`` when the request was sent and
    ``end`` when the stream closed (same clock, s)."""
    res = StreamResult(outcome="truncated", total_ms=(end - start) * 1000)
    last_token: float | None = None
    for ev in events:
        ms = (ev.t - start) * 1000
        if ev.name == "passages" and res.citation_ms is None:
            res.citation_ms = ms
            res.cached = _json(ev.data).get("cached")
        elif ev.name == "token":
            res.tokens += 1
            if last_token is None:
                res.ttft_ms = ms
            else:
                res.gaps_ms.append((ev.t - last_token) * 1000)
            last_token = ev.t
        elif ev.name == "done":
            body = _json(ev.data)
            res.outcome = "done"
            res.cached = body.get("cached", res.cached)
            res.timings_ms = body.get("timings_ms")
        elif ev.name == "error":
            res.outcome = "error"
            err = _json(ev.data).get("error")
            res.error = str(err.get("code") or "unknown") if isinstance(err, dict) else "unknown"
    return res


# ---------------------------------------------------------------------- arrivals and the mix


def arrival_times(
    rate: float, duration_s: float, process: str = "uniform", seed: int = 0
) -> list[float]:
    """When the open loop's requests start (s from the level's start), within ``[0, duration)``.

    ``uniform``: every ``1/rate`` s from 0. ``poisson``: exponential gaps of mean ``1/rate``
    (``random.Random(seed)``), also from 0, so both start the level at once.
    """
    if rate <= 0 or duration_s <= 0:
        return []
    if process == "uniform":
        # k / rate, not a running sum: no drift from adding a rounded interval many times.
        return [k / rate for k in range(math.ceil(duration_s * rate) + 1) if k / rate < duration_s]
    if process != "poisson":
        raise ValueError(f"arrival process must be one of {ARRIVALS}, got {process!r}")
    rng = random.Random(seed)
    times, t = [], 0.0
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def is_hit(i: int, ratio: float) -> bool:
    """Whether request ``i`` (0, 1, ...) of a stream should repeat a pre-warmed question.

    Exactly ``floor(n * ratio)`` of the first ``n`` requests are, spread evenly: a level holds
    few requests, and a random draw would move the realised share by several points (about
    ±6 at 50 requests and ratio 0.3). The ratio is taken as a fraction, so 0.3 is 3/10 exactly.
    """
    r = Fraction(ratio).limit_denominator(10_000)
    return math.floor((i + 1) * r) > math.floor(i * r)


def question_pool(files: Sequence[Sequence[str]], limit: int) -> list[str]:
    """The first ``limit`` distinct questions of several lists, taken in turn from each (nq,
    squad, nq, ...), so a pool of any size mixes the dev sets evenly."""
    pool: list[str] = []
    seen: set[str] = set()
    for row in range(max((len(f) for f in files), default=0)):
        for f in files:
            if row < len(f) and f[row] not in seen:
                seen.add(f[row])
                pool.append(f[row])
                if len(pool) >= limit:
                    return pool
    return pool


# ----------------------------------------------------------------------------------- summary


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """n, mean, p50, p95, p99 (linear interpolation); None where there are no values."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


def p95_with_errors(ok_ms: Sequence[float], errors: int) -> float:
    """p95 of the total time over all requests, a failed one counting as slower than any bound
    (an error is not an answer in time); ``inf`` when the 95th percentile falls on one."""
    xs = sorted(ok_ms) + [math.inf] * errors
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * 0.95
    lo, hi = math.floor(pos), math.ceil(pos)
    if xs[hi] == math.inf:  # hi == lo then means xs[lo] is inf too
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def knee(points: Iterable[tuple[float, float]], bound_ms: float) -> float | None:
    """The highest arrival rate up to which every measured rate kept its p95 (``points``:
    ``(rate, p95 ms)``) under ``bound_ms``; None if the lowest rate did not. A rate that passes
    above one that failed is noise or luck, not capacity, so it does not count."""
    best: float | None = None
    for rate, p95 in sorted(points):
        if not p95 <= bound_ms:  # NaN (no requests) fails too
            break
        best = rate
    return best
