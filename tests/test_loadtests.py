"""The load-test runner end to end: real Locust runs against a small real HTTP server.

The server (FastAPI + uvicorn in a thread) speaks the ``/answer`` wire shape: ``cached`` and
``X-Cache`` (a question seen before is a hit unless ``Cache-Control: no-cache``), and a 429 with
``Retry-After`` and the error shape when a second request arrives while one is in flight. It stands
in for the models so the test takes seconds; ``loadtests/run.py --smoke`` against the real service
is the manual end-to-end check.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gainrag.config import REPO_ROOT
from gainrag_harness import free_port, missing

UNCACHED_S = 0.2  # one computed answer; long enough that two users collide (429)


def fake_service() -> FastAPI:
    app = FastAPI()
    seen: set[str] = set()
    state = {"in_flight": 0}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/answer")
    async def answer(request: Request) -> JSONResponse:
        if state["in_flight"] >= 1:
            error = {"message": "1 request in flight", "type": "overloaded", "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        state["in_flight"] += 1
        try:
            question = (await request.json())["question"]
            no_cache = "no-cache" in request.headers.get("cache-control", "")
            hit = question in seen and not no_cache
            await asyncio.sleep(0.002 if hit else UNCACHED_S)
            seen.add(question)
            total = 2.0 if hit else UNCACHED_S * 1000
            body = {
                "request_id": "x",
                "answer": "an answer",
                "passages": [],
                "pseudo_passage": "",
                "timings_ms": {
                    "retrieve": 0.0 if hit else 10.0,
                    "pseudo": 0.0 if hit else 100.0,
                    "select": 0.0 if hit else 50.0,
                    "generate": 0.0 if hit else 40.0,
                    "total": total,
                },
                "cached": hit,
                "degraded": [],
                "models": {},
            }
            return JSONResponse(body, headers={"X-Cache": "HIT" if hit else "MISS"})
        finally:
            state["in_flight"] -= 1

    return app


@pytest.fixture
def service_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake_service(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_sweep_writes_report_from_real_locust_runs(service_url: str, tmp_path: Path) -> None:
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
        str(REPO_ROOT / "loadtests" / "run.py"),
        "--url",
        service_url,
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
    assert report["command"].startswith("python loadtests/run.py --url")
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
