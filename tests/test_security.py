"""API keys, per-key limits, cache refresh permission, endpoint switches, CORS and metrics labels,
on the real gateway app over a fake generator (no models needed)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY

from gainrag.api.admission import Admission, RedisBuckets
from gainrag.api.auth import Principal, WorkerToken
from gainrag.api.drain import Drain
from gainrag.api.workers.shared import worker_app
from gainrag.cli import main
from gainrag.config import RedisSettings, Settings
from gainrag.errors import ConfigurationError, RateLimitedError
from gainrag.keys import KeyRecord, append_key, hash_key, load_keys, new_key
from gainrag_harness import free_port, redis_service
from tests.fake_gateway import FakeGenerator, MemoryCache, fake_app, fake_settings
from tests.test_api import assert_error

KEYS = {
    "alice": {"max_in_flight": 2, "rate": 1000, "burst": 1000},
    "bob": {"can_refresh": True, "rate": 1000, "burst": 1000},
    "slow": {"rate": 0.5, "burst": 2},
    "gone": {"revoked": True},
}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file with the records above; returns it and name -> plain key."""
    path = tmp_path / "keys.jsonl"
    plain = {}
    for name, extra in KEYS.items():
        plain[name] = new_key()
        append_key(path, KeyRecord(name=name, sha256=hash_key(plain[name]), **extra))
    return path, plain


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            yield c


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def ask(c: httpx.AsyncClient, q: str = "who", key: str | None = None, **headers: str) -> Any:
    h = {**(bearer(key) if key else {}), **headers}
    return await c.post("/answer", json={"question": q}, headers=h)


async def test_open_mode_needs_no_key() -> None:
    async with serving(fake_app(fake_settings())) as c:
        r = await ask(c)
        assert r.status_code == 200, r.text
        r = await ask(c, key="anything")  # ignored without a keys file
        assert r.status_code == 200, r.text


async def test_missing_or_unknown_key_is_401_and_revoked_is_403(
    keys: tuple[Path, dict[str, str]],
) -> None:
    path, plain = keys
    async with serving(fake_app(fake_settings(api={"keys_file": path}))) as c:
        r = await ask(c)
        assert_error(r, 401, "missing_key", "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        r = await ask(c, key=plain["alice"] + "x")
        assert_error(r, 401, "invalid_key")
        assert r.headers["www-authenticate"] == "Bearer"
        r = await ask(c, authorization=f"Basic {plain['alice']}")
        assert_error(r, 401, "missing_key")
        assert_error(await ask(c, key=plain["gone"]), 403, "key_revoked", "gone")
        assert (await ask(c, key=plain["alice"])).status_code == 200
        # probes stay public
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200


async def test_rate_limit_is_429_with_retry_after(keys: tuple[Path, dict[str, str]]) -> None:
    path, plain = keys
    async with serving(fake_app(fake_settings(api={"keys_file": path}))) as c:
        codes = [(await ask(c, key=plain["slow"])).status_code for _ in range(2)]
        assert codes == [200, 200]  # the burst
        r = await ask(c, key=plain["slow"])
        assert_error(r, 429, "rate_limited", "0.5 requests/s")
        assert r.json()["error"]["type"] == "rate_limit_error"
        # 0.5 tokens/s, bucket empty: the next token is about 2 s away
        assert 1 <= int(r.headers["retry-after"]) <= 2
        assert (await ask(c, key=plain["bob"])).status_code == 200  # other keys are not limited


def in_flight(route: str = "/answer") -> float:
    return REGISTRY.get_sample_value("gainrag_in_flight", {"route": route}) or 0.0


async def test_one_key_cannot_starve_another(keys: tuple[Path, dict[str, str]]) -> None:
    path, plain = keys
    # 4 slots in all; alice may hold 2 (her record), bob the default share of half: 2
    settings = fake_settings(api={"keys_file": path, "max_in_flight": 4})
    async with serving(fake_app(settings)) as c:
        flood = [asyncio.create_task(ask(c, f"q{i} sleep=1", key=plain["alice"])) for i in range(5)]
        for _ in range(100):
            if in_flight() == 2:
                break
            await asyncio.sleep(0.01)
        assert in_flight() == 2
        bobs = await asyncio.gather(*(ask(c, f"b{i}", key=plain["bob"]) for i in range(2)))
        assert [r.status_code for r in bobs] == [200, 200]  # served while alice is saturated
        rs = await asyncio.gather(*flood)
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429]
    busy = next(r for r in rs if r.status_code == 429)
    assert_error(busy, 429, "key_busy", "alice")
    assert busy.headers["retry-after"] == "1"
    assert in_flight() == 0


async def test_no_cache_is_honoured_only_for_keys_that_may_refresh(
    keys: tuple[Path, dict[str, str]],
) -> None:
    path, plain = keys
    gen = FakeGenerator()
    app = fake_app(fake_settings(api={"keys_file": path}), gen, MemoryCache())
    async with serving(app) as c:
        first = await ask(c, "capital of peru", plain["alice"])
        assert first.headers["x-cache"] == "MISS"
        r = await ask(c, "capital of peru", plain["alice"], **{"cache-control": "no-cache"})
        assert r.headers["x-cache"] == "HIT" and gen.calls == 1  # alice cannot bypass it
        r = await ask(c, "capital of peru", plain["bob"], **{"cache-control": "no-cache"})
        assert r.headers["x-cache"] == "MISS" and gen.calls == 2  # bob may refresh
        assert r.json()["answer"] != first.json()["answer"]
        r = await ask(c, "capital of peru", plain["alice"])
        assert r.json()["answer"] == "answer #2"  # bob's refresh replaced the cached answer


async def test_no_cache_is_honoured_in_open_mode() -> None:
    gen = FakeGenerator()
    async with serving(fake_app(fake_settings(), gen, MemoryCache())) as c:
        await ask(c, "q")
        r = await ask(c, "q", **{"cache-control": "no-cache"})
        assert r.headers["x-cache"] == "MISS" and gen.calls == 2


async def test_keys_never_reach_the_logs(
    keys: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    path, plain = keys
    caplog.set_level(logging.DEBUG)
    async with serving(fake_app(fake_settings(api={"keys_file": path}))) as c:
        await ask(c, key=plain["alice"])
        await ask(c, key=plain["alice"] + "x")
        await ask(c, key=plain["gone"])
        for _ in range(3):
            await ask(c, key=plain["slow"])
        await c.post("/answer", content=b"{", headers=bearer(plain["bob"]))
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for key in plain.values():
        assert key not in text
        assert hash_key(key) not in text
    assert "key=alice" in caplog.text  # the access log names the key


async def test_metrics_and_docs_can_be_off_or_behind_a_key(
    keys: tuple[Path, dict[str, str]],
) -> None:
    path, plain = keys
    docs = ("/docs", "/redoc", "/openapi.json")
    off = fake_settings(api={"metrics_access": "off", "docs_access": "off"})
    async with serving(fake_app(off)) as c:
        for p in ("/metrics", *docs):
            assert_error(await c.get(p), 404, "not_found")
    keyed = fake_settings(api={"keys_file": path, "metrics_access": "key", "docs_access": "key"})
    async with serving(fake_app(keyed)) as c:
        for p in ("/metrics", *docs):
            r = await c.get(p)
            assert_error(r, 401, "missing_key")
            assert (await c.get(p, headers=bearer(plain["alice"]))).status_code == 200, p
        spec = (await c.get("/openapi.json", headers=bearer(plain["alice"]))).json()
        assert "/answer" in spec["paths"] and "/metrics" not in spec["paths"]
    public = fake_settings(api={"keys_file": path})  # the default: public
    async with serving(fake_app(public)) as c:
        for p in ("/metrics", *docs):
            assert (await c.get(p)).status_code == 200, p


def test_key_access_without_keys_and_bad_keys_files_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="KEYS_FILE"):
        fake_app(fake_settings(api={"metrics_access": "key"}))
    with pytest.raises(ConfigurationError, match="cannot read"):
        fake_app(fake_settings(api={"keys_file": tmp_path / "missing.jsonl"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "sha256": "not-hex"}\n')
    with pytest.raises(ConfigurationError, match="sha256"):
        fake_app(fake_settings(api={"keys_file": bad}))


async def test_keys_file_changes_are_picked_up(keys: tuple[Path, dict[str, str]]) -> None:
    path, _ = keys
    app = fake_app(fake_settings(api={"keys_file": path}))
    app.state.auth.keys.check_every_s = 0.0
    async with serving(app) as c:
        late = new_key()
        assert_error(await ask(c, key=late), 401, "invalid_key")
        append_key(path, KeyRecord(name="late", sha256=hash_key(late)))
        assert (await ask(c, key=late)).status_code == 200
        path.write_text("{broken\n")  # a bad edit keeps the last good keys
        assert (await ask(c, key=late)).status_code == 200


async def test_cors_is_off_by_default_and_an_allow_list() -> None:
    pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
    async with serving(fake_app(fake_settings())) as c:
        r = await c.options("/answer", headers=pre)
        assert "access-control-allow-origin" not in r.headers
        r = await ask(c, origin="https://app.example")
        assert "access-control-allow-origin" not in r.headers
    on = fake_settings(api={"cors_origins": ["https://app.example"]})
    async with serving(fake_app(on)) as c:
        r = await c.options("/answer", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await c.options("/answer", headers={**pre, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await ask(c, origin="https://app.example")
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def http_count(route: str, status: str) -> float:
    labels = {"route": route, "method": "POST", "status": status}
    return REGISTRY.get_sample_value("gainrag_http_request_seconds_count", labels) or 0.0


async def test_413_on_content_length_is_labelled_with_the_route() -> None:
    before = http_count("/answer", "413")
    async with serving(fake_app(fake_settings())) as c:
        r = await c.post(
            "/answer", content=b"x" * 20_000, headers={"content-type": "application/json"}
        )
    assert_error(r, 413, "payload_too_large", "byte limit")
    assert http_count("/answer", "413") == before + 1


async def test_in_flight_gauge_follows_requests() -> None:
    async with serving(fake_app(fake_settings())) as c:
        task = asyncio.create_task(ask(c, "sleep=0.5"))
        for _ in range(100):
            if in_flight() == 1:
                break
            await asyncio.sleep(0.01)
        assert in_flight() == 1
        assert (await task).status_code == 200
    assert in_flight() == 0


def test_keys_cli_prints_the_key_once_and_stores_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret" / "keys.jsonl"
    args = ["keys", "add", "web", "--file", str(path), "--rate", "2", "--can-refresh"]
    assert main(args) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("grag_") and len(key) > 40
    text = path.read_text()
    assert key not in text
    [rec] = load_keys(path)
    assert rec == KeyRecord(name="web", sha256=hash_key(key), rate=2.0, can_refresh=True)
    assert path.stat().st_mode & 0o077 == 0  # owner-only
    assert main(args) == 2  # names are unique
    monkeypatch.setenv("GAINRAG_API__KEYS_FILE", str(path))
    out = subprocess.run(
        [sys.executable, "-m", "gainrag.cli", "keys", "hash"],
        input=key + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == rec.sha256
    assert json.loads(text.splitlines()[0])["name"] == "web"


@pytest.mark.servers  # starts its own process
async def test_buckets_are_shared_through_redis_and_fall_back_without_it(
    tmp_path: Path,
) -> None:
    redis = redis_service(tmp_path).start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        # two gateway replicas, one bucket
        a = Admission(8, Drain(), RedisSettings(url=url, timeout_ms=500))
        b = Admission(8, Drain(), RedisSettings(url=url, timeout_ms=500))
        who = Principal("carol", rate=0.1, burst=2)
        async with a.slot(who, "/answer"):
            pass
        async with b.slot(who, "/answer"):
            pass
        with pytest.raises(RateLimitedError) as err:
            async with a.slot(who, "/answer"):
                pass
        assert err.value.headers == {"Retry-After": "10"}
        await a.close()
        await b.close()
    finally:
        redis.stop()
    # Redis gone: limits still hold, in this process
    down = Admission(8, Drain(), RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    assert isinstance(down.shared, RedisBuckets)
    who = Principal("dave", rate=0.1, burst=1)
    async with down.slot(who, "/answer"):
        pass
    with pytest.raises(RateLimitedError):
        async with down.slot(who, "/answer"):
            pass
    await down.close()


async def test_worker_routes_require_the_worker_token() -> None:
    router = APIRouter()

    @router.post("/rerank", dependencies=[WorkerToken])
    async def rerank() -> dict[str, str]:
        return {"ok": "yes"}

    def app(token: str | None) -> FastAPI:
        settings = Settings(worker={"api_token": token})  # type: ignore[arg-type]
        return worker_app(
            "w", "w", settings, lambda: None, lambda _m: {}, router, service="w", model=object()
        )

    async with serving(app("s3cret")) as c:
        assert_error(await c.post("/rerank"), 401, "bad_token")
        assert_error(await c.post("/rerank", headers=bearer("nope")), 401, "bad_token")
        assert (await c.post("/rerank", headers=bearer("s3cret"))).status_code == 200
        assert (await c.get("/ready")).status_code == 200  # probes stay open
    async with serving(app(None)) as c:
        assert (await c.post("/rerank")).status_code == 200
