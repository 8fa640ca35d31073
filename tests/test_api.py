"""The HTTP contract of /answer, /health, /ready and every bad input, on real models."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY
from starlette.requests import Request

from gainrag.api import create_app
from gainrag.api.cancel import until_disconnect
from gainrag.api.middleware import RequestContextMiddleware
from gainrag.batching import MicroBatcher
from gainrag.config import Settings
from gainrag.errors import ClientClosedError, ValidationFailedError
from gainrag.pipeline import Components
from gainrag.types import Passage
from gainrag.wire import TEXT_PATTERN
from tests.conftest import make_settings


@pytest.fixture(scope="module")
async def client(settings: Settings, components: Components) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            yield c


def assert_error(r: httpx.Response, status: int, code: str, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "code"}
    assert err["code"] == code, err
    for n in needles:
        assert n in err["message"], err
    return err


async def test_answer_end_to_end(client: httpx.AsyncClient) -> None:
    r = await client.post("/answer", json={"question": "who got the first nobel prize in physics"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"].strip()
    assert r.headers["x-request-id"] == body["request_id"]
    assert len(body["passages"]) == 1
    p = body["passages"][0]
    assert {"id", "title", "text", "score", "pseudo"} <= set(p)
    assert "candidates" not in body
    t = body["timings_ms"]
    stages = ("retrieve", "pseudo", "select", "select_retrieved", "select_pseudo", "generate")
    assert set(t) == {*stages, "total"}
    assert all(t[s] > 0 for s in stages)  # pipelined selection (the default): both parts ran
    # The total encloses the critical path, in both of its forms; that the stages really overlap
    # is proven without timings in test_pipeline.py (a timing comparison here was flaky under load).
    assert t["total"] >= max(t["retrieve"], t["pseudo"]) + t["select"] + t["generate"]
    assert t["total"] >= (
        max(t["retrieve"] + t["select_retrieved"], t["pseudo"] + t["select_pseudo"]) + t["generate"]
    )
    assert body["models"]["generator"] == "smollm2-135m"
    assert body["models"]["selector"] == "cross-encoder:gainrag-minilm-l6"  # the shipped one


async def test_candidates_and_top_n(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/answer",
        json={
            "question": "where do they grow hops in the us",
            "top_n": 3,
            "return_candidates": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cands = body["candidates"]
    # k=10 retrieved, plus the pseudo-passage unless the LLM said N/A
    has_pseudo = any(c["pseudo"] for c in cands)
    assert len(cands) == 10 + has_pseudo
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
    assert body["passages"] == cands[:3]
    assert sorted(c["retrieval_rank"] for c in cands if not c["pseudo"]) == list(range(10))
    for c in cands:
        if c["pseudo"]:
            assert c["id"] == "pseudo" and c["title"] == "" and c["text"] == body["pseudo_passage"]


async def test_request_id_is_propagated(client: httpx.AsyncClient) -> None:
    r = await client.post("/answer", json={"question": ""}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


async def test_health_ready_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = (await client.get("/ready")).json()
    assert ready["status"] == "ready" and ready["models"]["index_version"]
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "/answer" in spec["paths"]


async def test_openapi_schema_states_the_bounds(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    props = spec["components"]["schemas"]["AnswerRequest"]["properties"]
    q = props["question"]
    assert (q["minLength"], q["maxLength"]) == (1, 1000)
    assert q["pattern"] == TEXT_PATTERN  # blank questions are schema-invalid too
    assert not re.fullmatch(q["pattern"], " \t") and re.fullmatch(q["pattern"], "who?")
    (integer,) = [b for b in props["top_n"]["anyOf"] if b.get("type") == "integer"]
    assert (integer["minimum"], integer["maximum"]) == (1, 10)
    assert "415" in spec["paths"]["/answer"]["post"]["responses"]


LONG = "x" * 1001


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        ({"json": {}}, 422, "missing_field", "'question' is required"),
        ({"json": {"question": ""}}, 422, "empty_question", "empty"),
        ({"json": {"question": "   \n\t "}}, 422, "empty_question", "whitespace"),
        ({"json": {"question": 123}}, 422, "validation_error", "question"),
        ({"json": {"question": ["a"]}}, 422, "validation_error", "question"),
        ({"json": {"question": None}}, 422, "validation_error", "question"),
        ({"json": {"question": "hi", "foo": 1}}, 422, "unknown_field", "'foo'"),
        ({"json": {"question": LONG}}, 422, "question_too_long", "limit is 1000"),
        ({"json": {"question": "hi", "top_n": 0}}, 422, "top_n_out_of_range", "between 1 and 10"),
        ({"json": {"question": "hi", "top_n": 11}}, 422, "top_n_out_of_range", "between 1 and 10"),
        ({"json": {"question": "hi", "top_n": "2"}}, 422, "validation_error", "top_n"),
        ({"json": {"question": "hi", "top_n": 1.5}}, 422, "validation_error", "top_n"),
        (
            {"json": {"question": "hi", "return_candidates": "yes"}},
            422,
            "validation_error",
            "return_candidates",
        ),
        ({"json": ["who"]}, 422, "validation_error", "JSON object"),
        ({"json": {"question": "who\x00 wrote hamlet"}}, 422, "invalid_text", "U+0000"),
        ({"json": {"question": "who \x1b[2J wrote"}}, 422, "invalid_text", "control character"),
        ({"json": {"question": "\u200b\u200d\ufeff"}}, 422, "empty_question", "invisible"),
        ({"json": {"question": "😀" * 400}}, 422, "question_too_long", "tokens"),
        (
            {
                "content": b'{"question": "who \\ud800 wrote hamlet"}',
                "headers": {"content-type": "application/json"},
            },
            422,
            "invalid_text",
            "surrogate",
        ),
        (
            {"content": b'{"question": "hi"}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            "nested too deeply",
        ),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            "not valid JSON",
        ),
        (
            {"content": b"x" * 20000, "headers": {"content-type": "application/json"}},
            413,
            "payload_too_large",
            "byte limit",
        ),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, kwargs: dict[str, Any], status: int, code: str, needle: str
) -> None:
    r = await client.post("/answer", **kwargs)
    assert_error(r, status, code, needle)


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is counted
        for _ in range(10):
            yield b" " * 4000

    r = await client.post("/answer", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large", "byte limit")


async def test_server_keeps_serving_after_bad_input(client: httpx.AsyncClient) -> None:
    for body in (b"{", b"[]", b'{"question": 1}'):
        await client.post("/answer", content=body, headers={"content-type": "application/json"})
    r = await client.post("/answer", json={"question": "what's the dog's name on tom and jerry"})
    assert r.status_code == 200 and r.json()["answer"]


async def test_unknown_route_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    r = await client.get("/answer")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


async def test_body_that_is_not_utf8_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/answer", content=b'{"question": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_json", "UTF-8")


async def test_unhandled_errors_are_500_with_request_id_and_no_details() -> None:
    async def crashing_app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("secret /internal/path")

    app = RequestContextMiddleware(crashing_app, max_body_bytes=1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/", headers={"x-request-id": "req-42"})
    err = assert_error(r, 500, "internal_error", "req-42")
    assert "secret" not in err["message"]
    assert r.headers["x-request-id"] == "req-42"


async def test_client_disconnect_cancels_the_work() -> None:
    cancelled = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.05)  # the client hangs up while the answer is being computed
        return {"type": "http.disconnect"}

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "answer"

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    await request.body()
    with pytest.raises(ClientClosedError):
        await until_disconnect(request, work())
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_models_load_in_the_background(settings: Settings, llm_dir: Path) -> None:
    app = create_app(settings)  # builds its own components
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            assert (await c.get("/health")).status_code == 200  # live while loading
            for _ in range(600):
                r = await c.get("/ready")
                if r.status_code == 200:
                    break
                assert_error(r, 503, "not_ready", "loading")
                await asyncio.sleep(0.1)
            assert r.status_code == 200
            ok = await c.post("/answer", json={"question": "who won"})
            assert ok.status_code == 200, ok.text


async def test_load_failure_is_reported_by_ready_and_answer(
    tmp_path: Path, small_corpus: Path, llm_dir: Path
) -> None:
    app = create_app(make_settings(tmp_path / "no-index", small_corpus))
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            for _ in range(600):
                r = await c.get("/ready")
                if r.json()["error"]["code"] == "load_failed":
                    break
                await asyncio.sleep(0.1)
            assert_error(r, 503, "load_failed", "gainrag index build")
            assert_error(await c.post("/answer", json={"question": "q"}), 503, "load_failed")
            assert (await c.get("/health")).status_code == 200


async def test_overload_is_429_with_retry_after(
    index_dir: Path, small_corpus: Path, components: Components
) -> None:
    settings = make_settings(index_dir, small_corpus, api={"max_in_flight": 1})
    app = create_app(settings, components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            rs = await asyncio.gather(
                *(c.post("/answer", json={"question": f"hops in the us {i}"}) for i in range(3))
            )
    codes = sorted(r.status_code for r in rs)
    assert codes[0] == 200 and codes[-1] == 429
    busy = next(r for r in rs if r.status_code == 429)
    assert_error(busy, 429, "overloaded", "retry")
    assert busy.headers["retry-after"] == "1"


class _BrokenSelector:
    """A selector whose backend crashes with internals in the message."""

    name = "broken"
    version = "0"

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        raise RuntimeError("secret /internal/path in the exception")

    async def close(self) -> None:
        return None


async def test_backend_failure_is_502_without_leaking_details(
    index_dir: Path, small_corpus: Path, components: Components
) -> None:
    settings = make_settings(index_dir, small_corpus, pipeline={"fallback": False})
    broken = Components(components.retriever, _BrokenSelector(), components.generator)
    app = create_app(settings, broken)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            r = await c.post("/answer", json={"question": "who won"})
    err = assert_error(r, 502, "select_failed", "select")
    assert "secret" not in err["message"]


async def test_selector_failure_falls_back_to_retrieval_order(
    settings: Settings, components: Components
) -> None:
    broken = Components(components.retriever, _BrokenSelector(), components.generator)
    app = create_app(settings, broken)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            r = await c.post("/answer", json={"question": "who won", "return_candidates": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["kind"] for d in body["degraded"]] == ["selector_down"]
    assert "secret" not in r.text
    ranks = [c.get("retrieval_rank") for c in body["candidates"]]
    retrieved = [x for x in ranks if x is not None]
    assert retrieved == list(range(len(retrieved)))  # retrieval order ...
    assert all(x is None for x in ranks[len(retrieved) :])  # ... the pseudo-passage last
    assert body["passages"][0]["retrieval_rank"] == 0


async def test_deadline_is_504(index_dir: Path, small_corpus: Path, components: Components) -> None:
    settings = make_settings(index_dir, small_corpus, pipeline={"timeout_s": 0.001})
    app = create_app(settings, components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            r = await c.post("/answer", json={"question": "who won"})
    assert_error(r, 504, "timeout", "GAINRAG_PIPELINE__TIMEOUT_S")


def _fallbacks() -> dict[str, float]:
    return {
        k: REGISTRY.get_sample_value("gainrag_fallbacks_total", {"kind": k}) or 0.0
        for k in ("retrieval_down", "selector_down")
    }


def _batched_items(components: Components) -> int:
    batchers: list[MicroBatcher[Any, Any]] = [
        getattr(c, "batcher")  # noqa: B009 - every in-process component has one
        for c in (components.retriever, components.selector, components.generator)
    ]
    return sum(b.stats.items for b in batchers)


SURROGATE = b'{"question": "who \\ud800 wrote hamlet"}'


async def test_a_bad_question_cannot_fail_the_others_in_its_batch(
    client: httpx.AsyncClient, components: Components
) -> None:
    before = _fallbacks()
    good = ["who wrote hamlet", "where do they grow hops in the us", "who won the first nobel"]
    bad = client.post("/answer", content=SURROGATE, headers={"content-type": "application/json"})
    rs = await asyncio.gather(bad, *(client.post("/answer", json={"question": q}) for q in good))
    assert_error(rs[0], 422, "invalid_text", "surrogate")
    for r in rs[1:]:
        assert r.status_code == 200, r.text
        assert r.json()["answer"] and r.json()["degraded"] == []
    assert _fallbacks() == before


async def test_a_prompt_the_model_cannot_take_fails_alone_in_a_real_batch(
    components: Components,
) -> None:
    # Past the gateway's checks (defence in depth): the generator's batch is bisected, the
    # others get their replies and the bad one a 422, never a 502.
    g = components.generator
    batcher: MicroBatcher[Any, Any] = g.batcher  # type: ignore[attr-defined]
    isolated = batcher.stats.isolated
    rs = await asyncio.gather(
        g.chat("who wrote hamlet", max_new_tokens=3),
        g.chat("who \ud800 wrote hamlet", max_new_tokens=3),
        g.chat("capital of france", max_new_tokens=3),
        return_exceptions=True,
    )
    assert isinstance(rs[0], str) and isinstance(rs[2], str)
    assert isinstance(rs[1], ValidationFailedError) and rs[1].code == "unprocessable_input"
    assert batcher.stats.isolated == isolated + 1


async def test_token_limits_are_checked_before_any_model_work(
    index_dir: Path, small_corpus: Path, components: Components
) -> None:
    settings = make_settings(index_dir, small_corpus, llm={"max_input_tokens": 1000})
    app = create_app(settings, components)
    items = _batched_items(components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            # 400 characters (under the 1000-character limit), ~1200 tokens
            r = await c.post("/answer", json={"question": "😀" * 400})
            assert_error(r, 422, "question_too_long", "tokens", "MAX_QUESTION_TOKENS")
            # ~300 tokens: fits alone, not with 10 passages in a 1000-token prompt
            r = await c.post("/answer", json={"question": "😀" * 100, "top_n": 10})
            assert_error(r, 422, "prompt_too_long", "top_n=10", "MAX_INPUT_TOKENS")
    assert _batched_items(components) == items  # no model saw either


async def test_bad_requests_are_422_not_429_when_the_server_is_full(
    index_dir: Path, small_corpus: Path, components: Components
) -> None:
    settings = make_settings(index_dir, small_corpus, api={"max_in_flight": 1})
    app = create_app(settings, components)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"json": {"question": ""}}, "empty_question"),
        ({"json": {"question": "x" * 1001}}, "question_too_long"),
        ({"json": {"question": "😀" * 400}}, "question_too_long"),
        ({"json": {"question": "hi", "top_n": 0}}, "top_n_out_of_range"),
        ({"json": {"question": 123}}, "validation_error"),
        ({"json": {"question": "hi", "foo": 1}}, "unknown_field"),
        ({"content": SURROGATE, "headers": {"content-type": "application/json"}}, "invalid_text"),
    ]
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            admission = app.state.gainrag.admission
            admission.in_flight = 1  # every slot is taken by a slow request
            for kwargs, code in bad:
                assert_error(await c.post("/answer", **kwargs), 422, code)
            assert_error(await c.post("/answer", json={"question": "hi"}), 429, "overloaded")
            assert admission.in_flight == 1  # nothing took or leaked a slot
            admission.in_flight = 0
