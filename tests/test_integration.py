"""The distributed deployment as real processes on loopback: redis-server, llama.cpp's
OpenAI-compatible server, the retrieval worker, the selector worker and the gateway.

One scenario, in order (each step depends on the state the previous one left):
answers -> a cache hit -> selector killed (fallback) -> retriever killed (fallback) -> LLM killed
(503) -> everything restarted (normal answers again).
"""

from __future__ import annotations

import re

import httpx

from gainrag_harness import Service

# The gateway's settings in the deployment of conftest's ``stack`` fixture.
GATEWAY_ENV = {
    "GAINRAG_RETRIEVAL__K": "10",
    "GAINRAG_LLM__MAX_NEW_TOKENS_PSEUDO": "24",
    "GAINRAG_LLM__MAX_NEW_TOKENS_ANSWER": "12",
}


def _metric(gateway: Service, name: str, labels: str = "") -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def _ask(gateway: Service, question: str, **headers: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/answer",
        json={"question": question},
        headers={"x-request-id": "itest-" + str(abs(hash(question)) % 10**8), **headers},
        timeout=120,
    )


def test_distributed_answer_path(stack: dict[str, Service], dev_questions: list[dict]) -> None:
    gw = stack["gateway"]
    questions = [q["question"] for q in dev_questions]

    # 1. Normal answers through every remote part.
    for q in questions[:2]:
        r = _ask(gw, q)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"].strip() and len(body["passages"]) == 1
        assert body["degraded"] == [] and body["cached"] is False
        assert body["models"]["generator"] == "openai:smollm2-135m"
        assert body["models"]["selector"].startswith("cross-encoder:")
        assert body["models"]["retriever"].startswith("faiss-cpu:")
        assert body["models"]["index_version"] != "unknown"
    # The request id reached the workers' logs.
    assert "itest-" in stack["selector"].tail(200_000)

    # 2. A repeated question is a cache hit, and the hit counter moves.
    hits = _metric(gw, "gainrag_cache_requests_total", 'kind="answer",result="hit"')
    again = _ask(gw, questions[0])
    assert again.json()["cached"] is True and again.headers["x-cache"] == "HIT"
    assert _metric(gw, "gainrag_cache_requests_total", 'kind="answer",result="hit"') == hits + 1
    assert _metric(gw, "gainrag_stage_seconds_count", 'stage="select"') >= 2

    # 3. Selector killed: retrieval order, said so, counted; degraded answers are not cached.
    stack["selector"].kill()
    r = _ask(gw, questions[2])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["kind"] for d in body["degraded"]] == ["selector_down"]
    assert body["passages"][0]["retrieval_rank"] == 0
    assert _metric(gw, "gainrag_fallbacks_total", 'kind="selector_down"') >= 1
    assert _ask(gw, questions[2]).json()["cached"] is False

    # 4. Retriever killed too: the pseudo-passage is the only context.
    stack["retriever"].kill()
    r = _ask(gw, questions[3])
    assert r.status_code == 200, r.text
    kinds = {d["kind"] for d in r.json()["degraded"]}
    assert "retrieval_down" in kinds
    assert all(p["pseudo"] for p in r.json()["passages"])
    assert _metric(gw, "gainrag_fallbacks_total", 'kind="retrieval_down"') >= 1

    # 5. LLM killed: nothing can answer -> 503 with a clear message (not a 500).
    stack["llm"].kill()
    r = _ask(gw, questions[4], **{"cache-control": "no-cache"})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "llm_down" and "llm" in err["message"] and "unreachable" in err["message"]

    # 6. Everything back: normal answers again, with no restart of the gateway.
    for name in ("llm", "retriever", "selector"):
        stack[name].start()
    r = _ask(gw, questions[5])
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] == [] and r.json()["answer"].strip()
    assert (httpx.get(gw.url + "/ready", timeout=10)).status_code == 200
