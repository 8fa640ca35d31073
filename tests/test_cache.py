"""The Redis cache against a real redis-server: keys, hits, bypass, outage and recovery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from gainrag.api import create_app
from gainrag.cache import Cache
from gainrag.cache_interface import cache_key
from gainrag.config import RedisSettings, Settings
from gainrag.pipeline import Components
from gainrag_harness import Service, free_port, redis_service


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with redis_service(tmp_path_factory.mktemp("redis")) as svc:
        yield svc


def _cache(svc: Service, **kw: object) -> Cache:
    return Cache(RedisSettings(url=f"{svc.url}/0", **kw))  # type: ignore[arg-type]


def _count(kind: str, result: str) -> float:
    labels = {"kind": kind, "result": result}
    return REGISTRY.get_sample_value("gainrag_cache_requests_total", labels) or 0.0


def test_keys_are_the_exact_model_text_and_every_version() -> None:
    v = {"index_version": "a", "selector_version": "b"}
    k = cache_key("answer", "who wrote hamlet", v)
    assert k == cache_key("answer", "who wrote hamlet", dict(reversed(list(v.items()))))
    # A spelling variant is another prompt, so another entry: it can never fill this one.
    variants = ("Who wrote Hamlet?", "WHO WROTE HAMLET", "ｗｈｏ wrote hamlet", "who  wrote hamlet")
    for variant in variants:
        assert cache_key("answer", variant, v) != k
    assert k.startswith("answer:") and len(k) == len("answer:") + 64
    for changed in ({**v, "index_version": "a2"}, {**v, "selector_version": "b2"}, {**v, "n": 2}):
        assert cache_key("answer", "who wrote hamlet", changed) != k
    assert cache_key("pseudo", "who wrote hamlet", v) != k
    assert cache_key("answer", "who wrote macbeth", v) != k


async def test_get_set_ttl(redis_server: Service) -> None:
    cache = _cache(redis_server, ttl_s=60, prefix="t1:")
    key = cache_key("answer", "q", {"v": 1})
    miss0, hit0 = _count("answer", "miss"), _count("answer", "hit")
    assert await cache.get("answer", key) is None
    await cache.set("answer", key, {"answer": "x", "n": [1, 2]})
    assert await cache.get("answer", key) == {"answer": "x", "n": [1, 2]}
    assert _count("answer", "miss") == miss0 + 1 and _count("answer", "hit") == hit0 + 1
    ttl = redis.Redis(port=redis_server.port).ttl(f"t1:{key}")
    assert 0 < ttl <= 60
    await cache.close()


@pytest.mark.servers  # starts its own process
async def test_outage_is_a_miss_logged_once_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = redis_service(tmp_path)
    cache = _cache(svc, timeout_ms=200, retry_s=0.3)
    key = cache_key("pseudo", "q", {})
    err0, skip0 = _count("pseudo", "error"), _count("pseudo", "skipped")
    with caplog.at_level(logging.WARNING, logger="gainrag.cache"):
        start = time.perf_counter()
        assert await cache.get("pseudo", key) is None  # nothing listens: refused at once
        await cache.set("pseudo", key, "text")  # inside the retry window: skipped
        assert await cache.get("pseudo", key) is None
        assert time.perf_counter() - start < 1.0
    assert _count("pseudo", "error") == err0 + 1
    assert _count("pseudo", "skipped") == skip0 + 2
    assert len([r for r in caplog.records if "cache unavailable" in r.message]) == 1

    svc.start()
    try:
        await asyncio.sleep(0.35)  # the retry window passes
        with caplog.at_level(logging.INFO, logger="gainrag.cache"):
            await cache.set("pseudo", key, "text")
            assert await cache.get("pseudo", key) == "text"
        assert any("available again" in r.message for r in caplog.records)
    finally:
        await cache.close()
        svc.stop()


async def test_slow_redis_is_bounded(redis_server: Service) -> None:
    cache = _cache(redis_server, timeout_ms=100, retry_s=0)
    key = cache_key("answer", "slow", {})
    admin = redis.Redis(port=redis_server.port)
    admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # the server stops answering
    try:
        err0 = _count("answer", "error")
        start = time.perf_counter()
        assert await cache.get("answer", key) is None
        assert time.perf_counter() - start < 1.0  # the budget, not the 1.5 s pause
        assert _count("answer", "error") == err0 + 1
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        await cache.close()


@pytest.fixture
async def cached_client(
    components: Components, settings: Settings, redis_server: Service
) -> AsyncIterator[httpx.AsyncClient]:
    # A fresh prefix per test: hits come only from this test's own requests.
    cache = _cache(redis_server, prefix=f"api{free_port()}:")
    comps = Components(components.retriever, components.selector, components.generator, cache)
    app = create_app(settings, components=comps)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c
    await cache.close()


async def test_answer_cache_hit_and_no_cache(
    cached_client: httpx.AsyncClient, dev_questions: list[dict]
) -> None:
    q = dev_questions[0]["question"]
    hits0, pseudo_hits0 = _count("answer", "hit"), _count("pseudo", "hit")
    first = await cached_client.post("/answer", json={"question": q})
    assert first.status_code == 200, first.text
    assert first.json()["cached"] is False and first.headers["x-cache"] == "MISS"

    # The same text after the check's NFC + strip is the same prompt: a hit.
    again = await cached_client.post("/answer", json={"question": "  " + q + "\n"})
    body = again.json()
    assert body["cached"] is True and again.headers["x-cache"] == "HIT"
    assert _count("answer", "hit") == hits0 + 1
    assert body["answer"] == first.json()["answer"]
    assert body["passages"] == first.json()["passages"]
    assert body["timings_ms"]["generate"] == 0 and body["timings_ms"]["total"] > 0

    # Another spelling is another prompt: it gets (and fills) its own entry.
    shouted = await cached_client.post("/answer", json={"question": q.upper() + "?"})
    assert shouted.json()["cached"] is False and shouted.headers["x-cache"] == "MISS"
    # Another top_n is another answer.
    other = await cached_client.post("/answer", json={"question": q, "top_n": 2})
    assert other.json()["cached"] is False
    # Cache-Control: no-cache recomputes (the pseudo-passage too) and stores the result.
    fresh = await cached_client.post(
        "/answer", json={"question": q}, headers={"cache-control": "no-cache"}
    )
    assert fresh.json()["cached"] is False and fresh.headers["x-cache"] == "MISS"
    assert fresh.json()["timings_ms"]["generate"] > 0
    assert _count("pseudo", "hit") == pseudo_hits0 + 1  # only top_n=2 reused the pseudo-passage
