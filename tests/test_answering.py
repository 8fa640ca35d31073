"""The request skeleton both answering routes share (``gainrag.api.answering``): the cache
header, admission and a client that leaves, on ``/answer`` and ``/v1/chat/completions``, streamed
and not, and the error event of each route's format; on the real gateway app over a fake
generator (no models needed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client import REGISTRY

from gainrag.errors import UpstreamError
from tests.fake_gateway import FakeGenerator, MemoryCache, fake_app, fake_settings
from tests.test_api import assert_error

ROUTES = ("/answer", "/v1/chat/completions")


def body(route: str, question: str, stream: bool = False) -> dict[str, Any]:
    """A request for ``question`` in the route's own format."""
    if route == "/answer":
        return {"question": question, "stream": stream}
    return {"model": "any", "messages": [{"role": "user", "content": question}], "stream": stream}


def in_flight(route: str) -> float:
    return REGISTRY.get_sample_value("gainrag_in_flight", {"route": route}) or 0.0


def streams(outcome: str) -> float:
    return REGISTRY.get_sample_value("gainrag_streams_total", {"outcome": outcome}) or 0.0


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            yield manager.app, c  # type: ignore[misc]


async def test_the_openai_route_reads_and_fills_the_answer_cache_and_ignores_no_cache() -> None:
    gen = FakeGenerator()
    async with serving(fake_app(fake_settings(), gen, MemoryCache())) as (_, c):
        first = await c.post("/answer", json=body("/answer", "capital of peru"))
        assert first.headers["x-cache"] == "MISS" and gen.calls == 1
        chat = "/v1/chat/completions"
        r = await c.post(chat, json=body(chat, "capital of peru"))
        assert r.status_code == 200, r.text
        assert r.headers["x-cache"] == "HIT" and gen.calls == 1  # the same checked question
        assert r.json()["choices"][0]["message"]["content"] == first.json()["answer"]
        # docs/api.md: Cache-Control: no-cache is /answer's, not honoured here.
        r = await c.post(
            chat, json=body(chat, "capital of peru"), headers={"cache-control": "no-cache"}
        )
        assert r.headers["x-cache"] == "HIT" and gen.calls == 1
        r = await c.post(chat, json=body(chat, "capital of chile"))
        assert r.headers["x-cache"] == "MISS" and gen.calls == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ROUTES)
async def test_a_full_server_refuses_both_routes_before_the_first_byte(
    route: str, stream: bool
) -> None:
    async with serving(fake_app(fake_settings(api={"max_in_flight": 1}))) as (_, c):
        slow = asyncio.create_task(c.post(route, json=body(route, "sleep=1")))
        for _ in range(200):
            if in_flight(route) == 1:
                break
            await asyncio.sleep(0.01)
        assert in_flight(route) == 1  # the slot is labelled with its route
        for other in ROUTES:
            r = await c.post(other, json=body(other, "who", stream))
            assert_error(r, 429, "overloaded")
            assert r.headers["retry-after"] == "1"
        assert (await slow).status_code == 200
        assert in_flight(route) == 0


async def call_and_leave(app: FastAPI, path: str, payload: dict[str, Any], after_s: float) -> int:
    """POST ``payload`` straight to the ASGI app, and hang up ``after_s`` seconds after sending
    it; the response's status (499 when the handler noticed first, as a server would log)."""
    sent: list[dict[str, Any]] = []
    request = [{"type": "http.request", "body": json.dumps(payload).encode(), "more_body": False}]
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if request:
            return request.pop()
        if not left.is_set():
            await asyncio.sleep(after_s)
            left.set()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    await app(scope, receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ROUTES)
async def test_a_client_that_leaves_cancels_the_answer_and_frees_its_slot(
    route: str, stream: bool
) -> None:
    async with serving(fake_app(fake_settings())) as (app, c):
        disconnected = streams("disconnected")
        start = time.monotonic()
        status = await call_and_leave(app, route, body(route, "sleep=5", stream), after_s=0.2)
        assert time.monotonic() - start < 3  # the 5 s answer was cancelled
        # A stream has sent its first byte (200) and ends; a plain answer ends with 499.
        assert status == (200 if stream else 499)
        assert streams("disconnected") == disconnected + (1 if stream else 0)
        assert in_flight(route) == 0
        assert (await c.post(route, json=body(route, "who"))).status_code == 200


class FailingGenerator(FakeGenerator):
    """Fails every answer, after the stream's first byte (the closed-book context)."""

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        raise UpstreamError("the LLM server went away")


async def test_a_failure_after_the_first_byte_is_the_routes_error_event() -> None:
    async with serving(fake_app(fake_settings(), FailingGenerator())) as (_, c):
        errors = streams("error")
        r = await c.post("/answer", json=body("/answer", "who", stream=True))
        assert r.status_code == 200
        blocks = r.text.strip().split("\n\n")
        assert [b.split("\n")[0] for b in blocks] == ["event: passages", "event: error"]
        error = json.loads(blocks[-1].split("data: ", 1)[1])
        assert error == {
            "error": {
                "message": "the LLM server went away",
                "type": "upstream_error",
                "code": "upstream_error",
            }
        }
        chat = "/v1/chat/completions"
        r = await c.post(chat, json=body(chat, "who", stream=True))
        assert r.status_code == 200
        lines = [line for line in r.text.split("\n") if line]
        assert all(line.startswith("data: ") for line in lines)  # no event names
        assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
        assert json.loads(lines[-1][6:]) == error  # the same object, and no [DONE]
        assert streams("error") == errors + 2


async def test_an_unknown_field_is_reported_once() -> None:
    async with serving(fake_app(fake_settings())) as (_, c):
        r = await c.post("/answer", json={"question": "who", "x": 1})
        assert assert_error(r, 422, "unknown_field")["message"] == "unknown field 'x'"
