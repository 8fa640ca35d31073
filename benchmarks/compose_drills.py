"""``make compose-test``: the ``cpu`` compose profile checked and measured on its real containers.

Against the stack ``make compose-up`` started (``var/compose/up.json``), through the published
gateway port:

- the README example (``/answer``: the right answer, ``models.generator`` the 1.5B reader), the
  same streamed (SSE), ``/v1/chat/completions`` with the openai SDK, Cohere rerank with the cohere
  SDK on the selector container, bad input (400, 422), and Prometheus reporting every target up;
- ``/answer`` over 10 NQ dev questions (no cache), and the same questions through ``make run``'s
  embedded service (``gainrag serve``, default settings) on this machine, one after the other;
- drills, each while a client keeps asking: stop the selector container (degraded 200s, no 5xx),
  start it (normal answers, the gateway not restarted); restart Redis (no error, answers cached
  again); SIGKILL the LLM server (503 ``llm_down`` or another documented 5xx, then normal
  answers once Docker has restarted it);
- Grafana (``--profile grafana``) when its image is present, else recorded as skipped.

It writes ``benchmarks/results/compose.{json,md}`` (with ``up``'s build and start-up figures and
the image sizes) and exits 1 if any check failed.

    python -m benchmarks.compose_drills [--limit 10] [--skip-make-run]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, QUESTIONS, START_S, pct, question_texts, table, write_result
from gainrag_harness import gainrag_service, running
from gainrag_harness.compose import (
    CPU_IMAGES,
    CPU_JOBS,
    CPU_SERVICES,
    Compose,
    image_exists,
    image_size,
    recorded_stack,
)

NAME = "compose"
README_Q = "who got the first nobel prize in physics"
GENERATOR = "openai:qwen2.5-coder-1.5b"
CLIENT_TIMEOUT_S = 300.0
# /answer's documented 5xx with fallbacks on (docs/deployment.md, Failure policy).
DOCUMENTED_5XX = {502: {"llm_error"}, 503: {"llm_down"}, 504: {"timeout", "llm_timeout"}}


def gateway_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8000')}"


def outcome(r: httpx.Response) -> str:
    """The outcome of one /answer: ok, cached, degraded:<kinds> or "<status> <error code>"."""
    try:
        body = r.json()
    except ValueError:
        return f"{r.status_code} not_json"
    if r.status_code == 200:
        kinds = sorted({d["kind"] for d in body.get("degraded", [])})
        return "degraded:" + "+".join(kinds) if kinds else ("cached" if body["cached"] else "ok")
    err = body.get("error") if isinstance(body, dict) else None
    return f"{r.status_code} {err.get('code') if isinstance(err, dict) else '?'}"


def ask(http: httpx.Client, question: str, *, fresh: bool = True) -> tuple[str, float, Any]:
    """POST /answer; (outcome, seconds, body)."""
    t = time.monotonic()
    try:
        r = http.post(
            gateway_url() + "/answer",
            json={"question": question},
            headers={"cache-control": "no-cache"} if fresh else {},
        )
    except httpx.HTTPError as exc:
        return f"no response ({type(exc).__name__})", time.monotonic() - t, None
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
    return outcome(r), time.monotonic() - t, body


@dataclass
class Traffic:
    """One client asking fresh questions in a loop while a fault is injected."""

    questions: list[str]
    seen: list[tuple[float, str, float]] = field(default_factory=list)  # (sent, outcome, s)
    stop: threading.Event = field(default_factory=threading.Event)

    def loop(self) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
            n = 0
            while not self.stop.is_set():
                sent = time.monotonic()
                label, s, _ = ask(http, self.questions[n % len(self.questions)])
                self.seen.append((sent, label, s))
                n += 1

    def __enter__(self) -> Traffic:
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=CLIENT_TIMEOUT_S + 10)


@dataclass
class Checks:
    """Named pass/fail results with details."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append({"check": name, "ok": ok, "detail": detail})
        print(("PASS " if ok else "FAIL ") + f"{name}: {detail}")
        return ok

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if not r["ok"]]


def until(pred: Callable[[], tuple[bool, str]], timeout_s: float) -> tuple[bool, str, float]:
    """Call ``pred`` until it holds; (held, its last detail, seconds)."""
    t0 = time.monotonic()
    ok, detail = pred()
    while not ok and time.monotonic() - t0 < timeout_s:
        time.sleep(1)
        ok, detail = pred()
    return ok, detail, time.monotonic() - t0


def answers(
    http: httpx.Client, question: str, want: str, *, fresh: bool
) -> Callable[[], tuple[bool, str]]:
    """A probe for :func:`until`: ask ``question``; holds when the outcome is ``want``."""

    def probe() -> tuple[bool, str]:
        label = ask(http, question, fresh=fresh)[0]
        return label == want, label

    return probe


def api_checks(stack: Compose, checks: Checks, http: httpx.Client) -> dict[str, Any]:
    """The README example, streaming, the openai and cohere SDKs, bad input, Prometheus."""
    import cohere
    from openai import OpenAI

    out: dict[str, Any] = {}
    label, s, body = ask(http, README_Q)
    answer = (body or {}).get("answer", "")
    generator = (body or {}).get("models", {}).get("generator")
    out["readme"] = {"outcome": label, "s": round(s, 2), "answer": answer, "generator": generator}
    checks.add(
        "README example",
        label == "ok" and "Röntgen" in answer and generator == GENERATOR,
        f"{label} in {s:.1f} s: {answer!r}, models.generator {generator}",
    )
    label, s, body = ask(http, README_Q, fresh=False)
    checks.add("README example again (Redis)", label == "cached", f"{label} in {s:.2f} s")

    t = time.monotonic()
    events: list[str] = []
    done: dict[str, Any] = {}
    with http.stream(
        "POST",
        gateway_url() + "/answer",
        json={"question": README_Q, "stream": True},
        headers={"cache-control": "no-cache"},
    ) as r:
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                events.append(event)
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
    kinds = list(dict.fromkeys(events))
    checks.add(
        "streaming",
        kinds[:1] == ["passages"]
        and "token" in kinds
        and kinds[-1] == "done"
        and "Röntgen" in done.get("answer", ""),
        f"events {kinds} ({events.count('token')} tokens) in {time.monotonic() - t:.1f} s, "
        f"done.answer {done.get('answer')!r}",
    )

    client = OpenAI(base_url=gateway_url() + "/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S)
    reply = client.chat.completions.create(
        model="gainrag", messages=[{"role": "user", "content": README_Q}]
    )
    content = reply.choices[0].message.content or ""
    cites = (reply.model_extra or {}).get("citations") or [{}]
    checks.add(
        "openai SDK /v1/chat/completions",
        "Röntgen" in content,
        f"{content!r}, first citation {cites[0].get('title')!r}",
    )

    selector = f"http://{stack.ip('selector-cpu')}:8002"
    co = cohere.ClientV2(api_key="unused", base_url=selector)
    rr = co.rerank(
        model="gainrag",
        query=README_Q,
        top_n=1,
        documents=[
            "Wilhelm Röntgen won the first Nobel Prize in Physics in 1901.",
            "Deadpool 2 was released on May 18, 2018.",
        ],
    )
    top = rr.results[0]
    checks.add(
        "cohere SDK rerank on the selector container",
        top.index == 0,
        f"{selector}/v2/rerank: top index {top.index}, score {top.relevance_score:.3f}",
    )

    bad = {
        "empty body {}": http.post(gateway_url() + "/answer", json={}),
        "invalid JSON": http.post(
            gateway_url() + "/answer",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
    }
    got = {k: outcome(r) for k, r in bad.items()}
    checks.add(
        "bad input is a 4xx",
        got == {"empty body {}": "422 missing_field", "invalid JSON": "400 invalid_json"},
        str(got),
    )
    out["bad_input"] = got

    def targets() -> tuple[bool, str]:
        port = os.environ.get("PROMETHEUS_PORT", "9090")
        try:
            data = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            return False, repr(exc)
        health = {
            t["labels"].get("job", "?") + "/" + t["labels"]["instance"]: t["health"]
            for t in data["data"]["activeTargets"]
        }
        return len(health) >= 3 and all(v == "up" for v in health.values()), str(health)

    ok, detail, _ = until(targets, 60)
    checks.add("Prometheus: every target up", ok, detail)
    return out


def latency(http: httpx.Client, questions: list[str], url: str) -> dict[str, Any]:
    """Sequential fresh /answer over ``questions`` (one warm-up first, not counted)."""
    http.post(
        url + "/answer", json={"question": questions[0]}, headers={"cache-control": "no-cache"}
    )
    rows = []
    for q in questions:
        t = time.monotonic()
        r = http.post(url + "/answer", json={"question": q}, headers={"cache-control": "no-cache"})
        rows.append(
            {
                "outcome": outcome(r),
                "s": time.monotonic() - t,
                "total_ms": r.json().get("timings_ms", {}).get("total"),
            }
        )
    ok = [r["s"] for r in rows if r["outcome"] == "ok"]
    return {"client_s": pct(ok), "errors": len(rows) - len(ok), "rows": rows}


def drill(
    stack: Compose,
    checks: Checks,
    questions: list[str],
    name: str,
    fault: Callable[[], None],
    recover: Callable[[], None],
    during: Callable[[str], bool],
    allowed: Callable[[str], bool],
    *,
    want_during: bool = True,
    happened: Callable[[], bool] | None = None,
    record: str = "the container's restart count",
) -> dict[str, Any]:
    """Inject ``fault`` under traffic, probe until an answer shows it (``during``), ``recover``,
    then probe until a normal fresh answer; every answer seen must pass ``allowed``.

    ``happened`` confirms the fault from a record (``record`` names it: a container's restart
    count, the gateway's own counters) when no answer can show it: a fault that heals faster
    than the probes reach it, or one the service hides by design, is still a fault seen."""
    gateway_started = stack.inspect("gateway-cpu")["State"]["StartedAt"]
    with Traffic(questions[::-1]) as traffic, httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        time.sleep(2)
        t_fault = time.monotonic()
        fault()
        probes: list[str] = []

        def shows() -> tuple[bool, str]:
            label = ask(http, questions[len(probes) % len(questions)])[0]
            probes.append(label)
            if during(label):
                return True, label
            if happened is not None and happened():
                return True, f"{label} (no answer shows it; {record} does)"
            return False, label

        seen, last, s_seen = until(shows, 120) if want_during else (True, "-", 0.0)
        out_s = time.monotonic() - t_fault
        t_back = time.monotonic()
        recover()
        stack.wait_healthy(CPU_SERVICES, CPU_JOBS, timeout_s=600)
        healthy_s = time.monotonic() - t_back
        normal, last_after, _ = until(answers(http, questions[0], "ok", fresh=True), 300)
        normal_s = time.monotonic() - t_back
    labels = [lbl for _, lbl, _ in traffic.seen] + probes
    counts = {lbl: labels.count(lbl) for lbl in sorted(set(labels))}
    bad = sorted({lbl for lbl in labels if not allowed(lbl)})
    same_gateway = stack.inspect("gateway-cpu")["State"]["StartedAt"] == gateway_started
    checks.add(f"{name}: fault seen", seen, f"{last} after {s_seen:.1f} s")
    checks.add(f"{name}: only documented outcomes", not bad, f"{counts}; undocumented: {bad}")
    checks.add(
        f"{name}: recovers, gateway not restarted",
        normal and same_gateway,
        f"healthy {healthy_s:.1f} s and a normal answer {normal_s:.1f} s after recovery "
        f"began ({last_after}); gateway restarted: {not same_gateway}",
    )
    return {
        "outcomes": counts,
        "fault_seen_s": round(s_seen, 1),
        "fault_lasted_s": round(out_s, 1),
        "healthy_after_s": round(healthy_s, 1),
        "normal_after_s": round(normal_s, 1),
        "max_request_s": round(max([s for _, _, s in traffic.seen] or [0.0]), 1),
    }


def is_documented_5xx(label: str) -> bool:
    """Whether an outcome label ("503 llm_down") is a 5xx the API documents for /answer."""
    status, _, code = label.partition(" ")
    return status.isdigit() and code in DOCUMENTED_5XX.get(int(status), set())


def cache_failure_count() -> float:
    """The gateway's cache calls that failed or were skipped (Redis unreachable), from /metrics."""
    text = httpx.get(gateway_url() + "/metrics", timeout=10).text
    rows = re.findall(r"^gainrag_cache_requests_total\{([^}]*)\} (\S+)$", text, re.M)
    return sum(float(v) for labels, v in rows if re.search(r'result="(error|skipped)"', labels))


def drills(stack: Compose, checks: Checks, questions: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    normal = {"ok", "cached"}
    out["selector stop/start"] = drill(
        stack,
        checks,
        questions,
        "selector stopped",
        fault=lambda: stack.stop("selector-cpu"),
        recover=lambda: stack.start("selector-cpu"),
        during=lambda o: o == "degraded:selector_down",
        allowed=lambda o: o in normal or o == "degraded:selector_down",
    )
    # Redis down for as long as the answers take to show it (the cache's failed or skipped
    # calls in the gateway's own counters), then back: every answer meanwhile a plain 200.
    cache_failures = cache_failure_count()
    out["redis stop/start"] = drill(
        stack,
        checks,
        questions,
        "Redis stopped",
        fault=lambda: stack.stop("redis"),
        recover=lambda: stack.start("redis"),
        during=lambda o: False,
        allowed=lambda o: o in normal,
        happened=lambda: cache_failure_count() > cache_failures,
        record="the gateway's failed or skipped cache calls (/metrics)",
    )
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        ask(http, questions[1], fresh=True)
        ok, label, s = until(answers(http, questions[1], "cached", fresh=False), 120)
    checks.add("Redis back: answers cached again", ok, f"{label} after {s:.1f} s")
    llm_restarts = int(stack.inspect("llm-cpu").get("RestartCount", 0))
    out["llm crash"] = drill(
        stack,
        checks,
        questions,
        "LLM server killed (SIGKILL)",
        fault=lambda: stack.crash("llm-cpu"),
        recover=lambda: None,
        during=is_documented_5xx,
        allowed=lambda o: o in normal or is_documented_5xx(o),
        happened=lambda: int(stack.inspect("llm-cpu").get("RestartCount", 0)) > llm_restarts,
    )
    return out


def grafana(checks: Checks, env: dict[str, str]) -> dict[str, Any]:
    """Start the grafana profile's service when its image is here; else record the skip."""
    image = os.environ.get("GRAFANA_IMAGE", "grafana/grafana:12.1.1")
    stack = Compose(("cpu", "grafana"), env)
    if not image_exists(image):
        return {"skipped": f"image {image} absent (GRAFANA_IMAGE; deploy/README.md)"}
    stack.run("up", "-d", "--no-build", "grafana")
    stack.wait_healthy(("grafana",), timeout_s=300)
    port = os.environ.get("GRAFANA_PORT", "3000")
    r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10)
    checks.add("Grafana /api/health", r.status_code == 200, r.text[:200])
    return {"health": r.status_code}


def markdown(res: dict[str, Any], checks: Checks) -> str:
    up = res["up"]
    gib = {k: f"{v / 1e9:.2f} GB" for k, v in res["image_bytes"].items()}
    lines = [
        f"`make compose-up` ({up['finished']}): daemon {up['daemon']}, bases {up['bases_from']} "
        f"({up['bases']['PYTHON_BASE_IMAGE']}); build seconds {up['build_s']} (Docker's layer "
        f"cache: an unchanged image takes seconds); `docker-compose --profile cpu up -d` to every "
        f"service healthy and the index job done: **{up['up_to_healthy_s']} s**.",
        f"Load average when the test began: {res['loadavg']} (other jobs share the machine).",
        "",
        *table(["image", "size"], gib.items()),
        "",
        f"`/answer` over {res['limit']} NQ dev questions, one at a time, `Cache-Control: "
        "no-cache` (client seconds):",
        "",
        *table(
            ["service", "p50", "p95", "mean", "n ok", "errors"],
            [
                [
                    name,
                    f"{v['client_s']['p50']:.2f}",
                    f"{v['client_s']['p95']:.2f}",
                    f"{v['client_s']['mean']:.2f}",
                    v["client_s"]["n"],
                    v["errors"],
                ]
                for name, v in res["latency"].items()
            ],
        ),
        "",
        "Drills (one client asking fresh questions throughout; outcomes of every answer seen):",
        "",
        *table(
            [
                "drill",
                "outcomes",
                "fault seen after s",
                "healthy after s",
                "normal after s",
                "slowest request s",
            ],
            [
                [
                    k,
                    ", ".join(f"{o} x{n}" for o, n in d["outcomes"].items()),
                    d["fault_seen_s"],
                    d["healthy_after_s"],
                    d["normal_after_s"],
                    d["max_request_s"],
                ]
                for k, d in res["drills"].items()
            ],
        ),
        "",
        f"Grafana: {res['grafana']}",
        "",
        *table(
            ["check", "result", "detail"],
            [
                [
                    r["check"],
                    "pass" if r["ok"] else "**FAIL**",
                    str(r["detail"]).replace("|", "/")[:300],
                ]
                for r in checks.rows
            ],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=10, help="questions for the latency figures")
    ap.add_argument(
        "--skip-make-run",
        action="store_true",
        help="do not measure make run's embedded service beside the stack",
    )
    args = ap.parse_args()
    stack, up = recorded_stack()
    if up["profiles"] != ["cpu"]:
        raise SystemExit(f"the drills are the cpu profile's; up.json has {up['profiles']}")
    stack.wait_healthy(CPU_SERVICES, CPU_JOBS, timeout_s=60)
    questions = question_texts(QUESTIONS, args.limit + 8)
    checks = Checks()
    res: dict[str, Any] = {"up": up, "limit": args.limit, "loadavg": os.getloadavg()}
    res["image_bytes"] = {
        i: image_size(i)
        for i in [*CPU_IMAGES, up["bases"]["REDIS_IMAGE"], up["bases"]["PROMETHEUS_IMAGE"]]
    }
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        res["api"] = api_checks(stack, checks, http)
        res["latency"] = {
            "compose cpu profile": latency(http, questions[: args.limit], gateway_url())
        }
        if not args.skip_make_run:
            # make run's service: `gainrag serve` with default settings (Qwen2.5-Coder-1.5B in the
            # managed llama.cpp engine), started after the stack answered, alone at work.
            svc = gainrag_service("make-run", ["serve"], LOG_DIR, timeout_s=START_S)
            with running({"make-run": svc}):
                res["latency"]["make run (embedded)"] = latency(
                    http, questions[: args.limit], svc.url
                )
    res["drills"] = drills(stack, checks, questions[args.limit :])
    res["grafana"] = grafana(checks, stack.env)
    res["checks"] = checks.rows
    notes = [f"failed: {checks.failed}"] if checks.failed else []
    write_result(NAME, res, notes=notes, markdown=markdown(res, checks))
    if checks.failed:
        raise SystemExit(f"compose-test failed: {checks.failed}")


if __name__ == "__main__":
    main()
