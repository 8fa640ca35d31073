"""The load test: its pure parts on recorded bytes and exact numbers (Server-Sent Events into a
request's timings, the open loop's arrival times, the cache-hit mix, the question pool, the knee),
then the runner end to end: real Locust runs against a small real HTTP server.

The server (FastAPI + uvicorn in a thread) speaks the ``/answer`` wire shape, JSON and streamed:
``cached`` and ``X-Cache`` (a question seen before is a hit unless ``Cache-Control: no-cache``), a
429 with ``Retry-After`` and the error shape when more requests are in flight than its limit, and
the events ``passages``, ``token``…, ``done`` (or, once, ``error`` after the citation). It stands
in for the models so the test takes seconds; ``python -m loadtests.run --smoke`` against the real
service is the manual end-to-end check.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from loadtests.measure import (
    Event,
    SSEParser,
    arrival_times,
    is_hit,
    knee,
    p95_with_errors,
    question_pool,
    stats,
    stream_result,
)
from loadtests.run import summarize_samples

from gainrag.config import REPO_ROOT
from gainrag_harness import free_port, missing

UNCACHED_S = 0.2  # one computed answer; long enough that two users collide (429)
TOKENS = ("an", " answer", " here")  # a computed stream's token events


def fake_service(max_in_flight: int = 1) -> FastAPI:
    app = FastAPI()
    seen: set[str] = set()
    state = {"in_flight": 0, "computed_streams": 0}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    def sse(event: str, data: object) -> bytes:
        return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

    @app.post("/answer")
    async def answer(request: Request) -> Response:
        if state["in_flight"] >= max_in_flight:
            msg = f"{max_in_flight} requests in flight"
            error = {"message": msg, "type": "overloaded", "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        state["in_flight"] += 1
        released = False
        try:
            payload = await request.json()
            question = payload["question"]
            no_cache = "no-cache" in request.headers.get("cache-control", "")
            hit = question in seen and not no_cache
            total = 2.0 if hit else UNCACHED_S * 1000
            timings = {
                "retrieve": 0.0 if hit else 10.0,
                "pseudo": 0.0 if hit else 100.0,
                "select": 0.0 if hit else 50.0,
                "generate": 0.0 if hit else 40.0,
                "total": total,
            }
            headers = {"X-Cache": "HIT" if hit else "MISS"}
            if payload.get("stream"):
                # The second computed stream of the run fails after its citation (exactly one).
                fail = False
                if not hit:
                    state["computed_streams"] += 1
                    fail = state["computed_streams"] == 2

                async def events() -> AsyncIterator[bytes]:
                    try:
                        await asyncio.sleep(0.002 if hit else UNCACHED_S / 2)
                        seen.add(question)
                        yield sse("passages", {"request_id": "x", "selected": [], "cached": hit})
                        for text in ("an answer",) if hit else TOKENS:
                            if not hit:
                                await asyncio.sleep(0.03)
                            yield sse("token", {"text": text})
                            if fail:
                                code = {"message": "late", "type": "timeout", "code": "llm_timeout"}
                                yield sse("error", {"error": code})
                                return
                        done = {"answer": "an answer", "timings_ms": timings, "cached": hit}
                        yield sse("done", done)
                    finally:
                        state["in_flight"] -= 1

                released = True  # the stream's end releases the slot
                return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
            await asyncio.sleep(0.002 if hit else UNCACHED_S)
            seen.add(question)
            body = {
                "request_id": "x",
                "answer": "an answer",
                "passages": [],
                "pseudo_passage": "",
                "timings_ms": timings,
                "cached": hit,
                "degraded": [],
                "models": {},
            }
            return JSONResponse(body, headers=headers)
        finally:
            if not released:
                state["in_flight"] -= 1

    return app


# ------------------------------------------------------------------------------- pure parts

# A streamed answer as the service writes it (service/gainrag/api/streaming.py), with a comment
# line, CRLF line ends in the error-free part and a multi-byte character, split into the chunks a
# client might read, each stamped with its arrival time (s).
PASSAGES = b'event: passages\r\ndata: {"request_id": "r", "selected": [], "cached": false}\r\n\r\n'
RECORDED = [
    (0.0, b": keep-alive\n\n"),
    (0.5, PASSAGES[:20]),
    (1.5, PASSAGES[20:] + b'event: token\ndata: {"text": "R\xc3'),
    (2.0, b'\xb6ntgen"}\n\nevent: token\ndata: {"text": " W"}\n\n'),
    (2.25, b'event: token\ndata: {"text": "!"}\n\nevent: done\r'),
    (2.75, b'\ndata: {"answer": "R\xc3\xb6ntgen W!", "cached": false,\n'),
    (3.0, b'data:  "timings_ms": {"total": 2900.0}}\n\n'),
]


def parse(chunks: list[tuple[float, bytes]]) -> list[Event]:
    parser = SSEParser()
    return [ev for t, chunk in chunks for ev in parser.feed(chunk, t)]


def test_sse_parser_dispatches_each_event_at_the_chunk_that_ends_it() -> None:
    events = parse(RECORDED)
    assert [(e.name, e.t) for e in events] == [
        ("passages", 1.5),
        ("token", 2.0),
        ("token", 2.0),
        ("token", 2.25),
        ("done", 3.0),  # its CR at the end of a chunk was half of a CRLF, not a blank line
    ]
    assert json.loads(events[1].data) == {"text": "Röntgen"}  # split inside the character
    # data lines join with a newline; one space after the colon is dropped, the next one kept
    assert (
        events[4].data
        == '{"answer": "Röntgen W!", "cached": false,\n "timings_ms": {"total": 2900.0}}'
    )
    assert json.loads(events[4].data)["timings_ms"] == {"total": 2900.0}


def test_sse_parser_is_indifferent_to_how_the_bytes_are_split() -> None:
    whole = b"".join(chunk for _, chunk in RECORDED)
    at_once = parse([(1.0, whole)])
    byte_by_byte = parse([(1.0, whole[i : i + 1]) for i in range(len(whole))])
    expected = [(e.name, e.data) for e in parse(RECORDED)]
    assert [(e.name, e.data) for e in at_once] == expected
    assert [(e.name, e.data) for e in byte_by_byte] == expected
    # lone CRs end lines too; an event without data, or unterminated at the end, is dropped
    tail = parse([(0.0, b"event: token\rdata: x\r\revent: ping\n\nevent: token\ndata: y\n")])
    assert [(e.name, e.data) for e in tail] == [("token", "x")]
    assert [e.name for e in parse([(0.0, b"data: plain\n\n")])] == ["message"]


def test_stream_result_from_a_recorded_stream() -> None:
    res = stream_result(parse(RECORDED), start=0.25, end=3.25)
    assert res.outcome == "done" and res.error is None
    assert res.citation_ms == 1250.0  # passages complete at 1.5 s, sent at 0.25 s
    assert res.ttft_ms == 1750.0
    assert res.gaps_ms == [0.0, 250.0]  # two tokens in one chunk, then one 0.25 s later
    assert res.tokens == 3
    assert res.total_ms == 3000.0
    assert res.cached is False
    assert res.timings_ms == {"total": 2900.0}


def test_stream_result_counts_an_error_event_by_its_code_and_a_cut_stream_as_truncated() -> None:
    error = b'{"error": {"message": "m", "type": "timeout", "code": "llm_timeout"}}'
    chunks = [*RECORDED[:3], (2.5, b'\xb6"}\n\nevent: error\ndata: ' + error + b"\n\n")]
    res = stream_result(parse(chunks), start=0.0, end=2.5)
    assert res.outcome == "error" and res.error == "llm_timeout"
    assert (res.citation_ms, res.ttft_ms, res.tokens, res.gaps_ms) == (1500.0, 2500.0, 1, [])
    cut = stream_result(parse(RECORDED[:3]), start=0.0, end=4.0)
    assert cut.outcome == "truncated" and cut.error is None
    assert (cut.citation_ms, cut.ttft_ms, cut.total_ms) == (1500.0, None, 4000.0)


def test_open_loop_arrival_times() -> None:
    assert arrival_times(0.4, 10) == [0.0, 2.5, 5.0, 7.5]  # 10 s is not inside [0, 10)
    assert arrival_times(0.4, 10.5) == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert arrival_times(3, 1) == [0.0, 1 / 3, 2 / 3]
    assert arrival_times(0.1, 60) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert arrival_times(0.2, 0) == [] and arrival_times(0, 60) == []
    # poisson: exponential gaps from one seeded generator, from 0
    rng, expected, t = random.Random(7), [], 0.0
    while t < 30:
        expected.append(t)
        t += rng.expovariate(2.0)
    times = arrival_times(2.0, 30, "poisson", seed=7)
    assert times == expected and times[0] == 0.0
    assert times == sorted(times) and times[-1] < 30
    with pytest.raises(ValueError, match="uniform"):
        arrival_times(1, 1, "bursty")


def test_cache_hit_mix_is_exact_over_every_prefix() -> None:
    assert [is_hit(i, 0.3) for i in range(10)] == [False] * 3 + [True] + [False] * 2 + [
        True,
        False,
        False,
        True,
    ]
    for ratio in (0.0, 0.1, 0.25, 0.3, 0.5, 2 / 3, 1.0):
        hits = 0
        for n in range(1, 101):
            hits += is_hit(n - 1, ratio)
            assert hits == math.floor(n * ratio + 1e-9), (ratio, n)
    assert not any(is_hit(i, 0) for i in range(50)) and all(is_hit(i, 1) for i in range(50))


def test_question_pool_takes_the_files_in_turn() -> None:
    nq, squad = ["n0", "n1", "n2"], ["s0", "n1", "s2", "s3", "s4"]
    assert question_pool([nq, squad], 100) == ["n0", "s0", "n1", "n2", "s2", "s3", "s4"]
    assert question_pool([nq, squad], 3) == ["n0", "s0", "n1"]
    assert question_pool([[], squad], 2) == ["s0", "n1"]


def test_p95_with_errors_counts_a_failure_as_slower_than_any_bound() -> None:
    assert p95_with_errors([float(x) for x in range(1, 21)], 0) == pytest.approx(19.05)
    # 39 answers and 1 error: the 95th percentile (position 37.05) still falls on answers
    assert p95_with_errors([float(x) for x in range(1, 40)], 1) == pytest.approx(38.05)
    # 19 and 1: it falls between the slowest answer and the error
    assert p95_with_errors([float(x) for x in range(1, 20)], 1) == math.inf
    assert p95_with_errors([], 3) == math.inf
    assert math.isnan(p95_with_errors([], 0))
    assert stats([1.0, 2.0, 3.0, 4.0]) == {
        "n": 4,
        "mean": 2.5,
        "p50": 2.5,
        "p95": 3.85,
        "p99": 3.97,
    }


def test_knee_is_the_last_rate_before_the_first_over_the_bound() -> None:
    bound = 30_000.0
    assert knee([(0.1, 5_000.0), (0.2, 9_000.0), (0.4, 29_999.0), (0.8, 61_000.0)], bound) == 0.4
    assert knee([(0.8, math.inf), (0.1, 5_000.0), (0.4, 30_000.0)], bound) == 0.4  # any order
    # a pass above a failure is not capacity
    assert knee([(0.1, 5_000.0), (0.2, 31_000.0), (0.4, 20_000.0)], bound) == 0.1
    assert knee([(0.1, 30_001.0), (0.2, 1.0)], bound) is None
    assert knee([(0.1, 1.0), (0.2, 2.0), (0.4, 3.0)], bound) == 0.4
    assert knee([(0.1, 1.0), (0.2, math.nan)], bound) == 0.1  # no requests: not a pass


def test_summary_of_samples_pools_the_gaps_and_names_errors_by_code() -> None:
    def row(ms: float, **kw: object) -> dict[str, object]:
        base = {"t": 0.0, "ms": ms, "status": 200, "ok": True, "cached": False, "error": None}
        return {**base, "stream": True, "timings_ms": {"total": ms - 10}, **kw}

    rows = [
        row(1000.0, citation_ms=400.0, ttft_ms=800.0, gaps_ms=[50.0, 150.0], tokens=3),
        row(3000.0, citation_ms=600.0, ttft_ms=2000.0, gaps_ms=[100.0], tokens=2),
        row(5.0, cached=True, citation_ms=2.0, ttft_ms=3.0, gaps_ms=[], tokens=1),
        row(2500.0, ok=False, error="stream llm_timeout", citation_ms=700.0, gaps_ms=[900.0]),
        row(3.0, ok=False, status=429, error="429 overloaded", cached=None),
        row(3.0, ok=False, status=429, error="429 overloaded", cached=None),
    ]
    s = summarize_samples(rows, "mixed")
    assert (s["requests"], s["ok"], s["hits"], s["errors"]) == (6, 3, 1, 3)
    assert s["errors_by_code"] == {"429 overloaded": 2, "stream llm_timeout": 1}
    assert s["errors_by_status"] == {"429": 2, "stream": 1}
    t = s["timings_ms"]  # over the successful requests only, both kinds
    assert t["citation"] == {"n": 3, "mean": 334.0, "p50": 400.0, "p95": 580.0, "p99": 596.0}
    assert t["itl"]["n"] == 3 and t["itl"]["mean"] == 100.0 and t["itl"]["p50"] == 100.0
    assert t["total"]["p50"] == 1000.0
    assert s["by_kind_ms"]["computed"]["ttft"]["p50"] == 1400.0
    assert s["by_kind_ms"]["hit"]["total"]["n"] == 1
    assert s["latency_ms"]["p50"] == 1000.0  # mixed: every successful request
    assert s["tokens_mean"] == 2.0
    assert s["service_p50_ms"]["total"] == 1990.0  # computed answers only
    assert s["p95_total_with_errors_ms"] == math.inf  # 3 of 6 failed
    assert summarize_samples(rows, "uncached")["latency_ms"]["p50"] == 2000.0
    assert summarize_samples(rows, "cached")["latency_ms"]["p50"] == 5.0


# ------------------------------------------------------------------------------- end to end


@pytest.fixture
def service_url(request: pytest.FixtureRequest) -> Iterator[str]:
    port = free_port()
    app = fake_service(getattr(request, "param", 1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_closed_loop_sweep_writes_report_from_real_locust_runs(
    service_url: str, tmp_path: Path
) -> None:
    for module in ("locust", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            missing(module, 'pip install -c constraints.txt -e ".[loadtest]"')
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": f"question {i}?"}) + "\n" for i in range(8))
    )
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--url",
        service_url,
        "--no-stream",  # the JSON path; the streamed one is the next test's
        "--rates",
        "none",
        "--levels",
        "1,2",
        "--duration",
        "2",
        "--cached-duration",
        "2",
        "--questions",
        str(questions),
        "--limit",
        "8",
        "--cached-set",
        "3",
        "--stop-timeout",
        "5",
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "loadtest.json").read_text())
    assert report["command"].startswith("python -m loadtests.run --url")
    assert report["machine"]["cpus"] >= 1
    scenarios = report["results"]["scenarios"]
    assert list(scenarios) == ["uncached", "cached"]
    for name, sc in scenarios.items():
        assert [lv["users"] for lv in sc["levels"]] == [1, 2]
        for lv in sc["levels"]:
            assert lv["requests"] > 0 and lv["ok"] > 0, lv
            assert lv["rps"] > 0 and lv["ok_rps"] > 0, lv
            assert lv["requests"] == lv["ok"] + lv["failures"], lv
            assert sum(lv["failures_by_status"].values()) == lv["failures"], lv
            # Locust's final statistics (not its CSV of a second before exit): every request
            samples = work / f"{name}_u{lv['users']}_samples.jsonl"
            assert lv["locust_csv"].endswith("_final_stats.csv"), lv
            assert lv["requests"] == len(samples.read_text().splitlines()), lv
            assert set(lv["failures_by_status"]) <= {"429"}, lv
            lat = lv["latency_ms"]
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"], lv
            exact = lv["exact_latency_ms"]
            assert 0 < exact["p50"] <= exact["p95"] <= exact["p99"], lv
            if name == "uncached":
                # every request recomputed: ~UNCACHED_S each, and the service's own timings
                assert lat["p50"] >= UNCACHED_S * 1000 * 0.9, lv
                assert lv["service_p50_ms"]["total"] == pytest.approx(UNCACHED_S * 1000)
                assert lv["ok_rps"] <= 1.1 / UNCACHED_S, lv
                assert lv["hits"] == 0 and lv["hit_ratio"] == 0, lv
            else:
                # pre-warmed: every answer a hit, far faster than a computed one
                assert lv["hits"] == lv["ok"] and lv["hit_ratio"] == 1, lv
                assert lat["p50"] < UNCACHED_S * 1000 / 2, lv
        assert sc["levels"][0]["failures"] == 0  # one user never collides with itself
    # two closed-loop users against a one-at-a-time server: the second is turned away
    assert scenarios["uncached"]["levels"][1]["failures_by_status"].get("429", 0) >= 1

    md = (out / "loadtest.md").read_text()
    assert "## uncached" in md and "## cached" in md
    assert "| users | elapsed s | requests | ok | errors by status |" in md
    assert "loadtest.png" in md
    png = (out / "loadtest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    from PIL import Image

    with Image.open(out / "loadtest.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    assert (work / "uncached_u2_stats.csv").exists()


@pytest.mark.parametrize("service_url", [3], indirect=True)  # 3 requests in flight, then 429
def test_streamed_open_loop_and_cache_mix_from_real_locust_runs(
    service_url: str, tmp_path: Path
) -> None:
    for module in ("locust", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            missing(module, 'pip install -c constraints.txt -e ".[loadtest]"')
    files = []
    for name in ("nq", "squad"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": f"{name} {i}?"}) + "\n" for i in range(6)))
        files.append(str(path))
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "loadtests.run", "--url", service_url, "--scenarios", "uncached"]
    cmd += ["--levels", "1", "--duration", "2", "--rates", "1,2,40", "--rate-duration", "2"]
    cmd += ["--cache-hit-ratio", "0.5", "--cached-set", "2", "--limit", "8", "--p95-bound-s", "1"]
    cmd += [
        "--stop-timeout",
        "5",
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--questions",
        *files,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "loadtest.json").read_text())
    res = report["results"]
    assert res["params"]["stream"] is True and res["params"]["rates"] == [1.0, 2.0, 40.0]
    assert len(res["load_average_start"]) == 3
    sc = res["scenarios"]["mixed"]  # a cache-hit ratio above 0 names the scenario
    assert list(res["scenarios"]) == ["mixed"] and sc["prewarmed"] == 2

    (lv,) = sc["levels"]
    samples = [json.loads(x) for x in (work / "mixed_u1_samples.jsonl").read_text().splitlines()]
    assert lv["requests"] == len(samples) == lv["ok"] + lv["failures"], lv
    # the one stream that failed after its citation counts as an error, by its code
    assert lv["failures_by_error"] == {"stream llm_timeout": 1}, lv
    # one user: exactly every second request repeats a pre-warmed question, and hits
    assert [r["want_hit"] for r in samples] == [i % 2 == 1 for i in range(len(samples))]
    assert lv["hits"] == len(samples) // 2, lv
    assert {r["question"] for r in samples if r["want_hit"]} <= {"nq 0?", "squad 0?"}

    for level in [lv, *sc["rates"]]:
        t = level["timings_ms"]
        assert t["citation"]["n"] == t["ttft"]["n"] == t["total"]["n"] == level["ok"], level
        assert 0 < t["citation"]["p50"] <= t["ttft"]["p50"] <= t["total"]["p50"], level
        assert t["itl"]["n"] > 0 and t["itl"]["p50"] <= t["itl"]["p95"], level
        assert level["by_kind_ms"]["computed"]["itl"]["n"] > 0, level  # hits: one token

    r1, r2, r40 = sc["rates"]
    for rt in (r1, r2, r40):
        samples_rt = (work / f"mixed_r{rt['rate']:g}_samples.jsonl").read_text().splitlines()
        # every scheduled arrival started, answered or not
        assert rt["arrivals"] == len(arrival_times(rt["rate"], 2)) == len(samples_rt), rt
        assert rt["requests"] == rt["ok"] + rt["failures"], rt
    for rt in (r1, r2):  # arrivals 1 s and 0.5 s apart, answers in ~0.2 s: never 3 in flight
        assert rt["failures"] == 0 and rt["hits"] == rt["arrivals"] // 2, rt
    # 40/s, half computed (~0.2 s each): more than 3 in flight, so 429s, which no closed loop
    # would have sent
    assert r40["failures_by_status"].get("429", 0) > 0, r40
    assert r40["p95_total_with_errors_ms"] == "inf"
    assert sc["knee_rate"] == 2.0

    md = (out / "loadtest.md").read_text()
    assert "## mixed" in md and "Load average before the run:" in md
    assert "| arrivals/s | requests | late p95 |" in md
    assert "citation p50 / p95 | TTFT p50 / p95 | ITL mean / p50 / p95 |" in md
    assert "**Knee: 2 requests/s**" in md and "1 s" in md
    from PIL import Image

    with Image.open(out / "loadtest.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
