"""Admission of expensive requests: the drain, a global and a per-key in-flight limit, and a
per-key token bucket.

Use it around the work of a route, after validation::

    async with admission.slot(principal, "/answer"):
        ...

Refusals: 503 ``shutting_down`` while draining; 429 ``key_busy`` when the key holds its share of
``max_in_flight`` (so one key cannot starve the others); 429 ``overloaded`` when the server holds
``max_in_flight``; 429 ``rate_limited`` with ``Retry-After`` (seconds until the bucket has a
token) when the key is over its rate. The buckets live in Redis when ``GAINRAG_REDIS__URL`` is set
(shared by every gateway replica, updated atomically by a Lua script) and fall back to this
process while Redis fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gainrag import telemetry, tracing
from gainrag.api.auth import Principal
from gainrag.api.drain import Drain
from gainrag.config import RedisSettings
from gainrag.errors import OverloadedError, RateLimitedError, UnavailableError
from gainrag.redis_conn import Outage, bounded_client

log = logging.getLogger(__name__)


class LocalBuckets:
    """Token buckets in this process, one per key name."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # name -> (tokens, monotonic time)

    def take(self, name: str, rate: float, burst: int) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        now = time.monotonic()
        tokens, then = self._state.get(name, (float(burst), now))
        tokens = min(float(burst), tokens + (now - then) * rate)
        if tokens >= 1.0:
            self._state[name] = (tokens - 1.0, now)
            return 0.0
        self._state[name] = (tokens, now)
        return (1.0 - tokens) / rate


# KEYS[1]: the bucket hash; ARGV: rate (tokens/s), burst. Returns the wait in ms (0 = admitted).
# Redis's clock, not the callers': replicas with skewed clocks share one bucket correctly.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RedisBuckets:
    """Token buckets shared through Redis, with :class:`LocalBuckets` while Redis fails.

    Like the cache, every call has the cache's time budget, a failure is logged once and Redis
    is skipped for ``retry_s`` before it is tried again.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.timeout_s = settings.timeout_ms / 1000.0
        self.client = bounded_client(settings)
        self.script = self.client.register_script(_TAKE)
        self.local = LocalBuckets()
        self.outage = Outage("shared rate limits (Redis)", settings.retry_s, log)

    async def take(self, name: str, rate: float, burst: int) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        if self.outage.skipping():
            return self.local.take(name, rate, burst)
        try:
            async with asyncio.timeout(self.timeout_s):
                wait_ms = await self.script(
                    keys=[f"{self.settings.prefix}bucket:{name}"], args=[rate, burst]
                )
        except Exception as exc:  # down, slow or misbehaving: never fail the request for it
            self.outage.failed(exc)
            return self.local.take(name, rate, burst)
        self.outage.ok()
        return float(wait_ms) / 1000.0

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


class Admission:
    """The in-flight limits, the buckets and the drain, for one process (see the module doc)."""

    def __init__(
        self, max_in_flight: int, drain: Drain, redis: RedisSettings | None = None
    ) -> None:
        self.max_in_flight = max_in_flight
        self.drain = drain
        self.in_flight = 0
        self.per_key: Counter[str] = Counter()
        self.local = LocalBuckets()
        self.shared = RedisBuckets(redis) if redis is not None and redis.url else None

    async def _take(self, who: Principal) -> float:
        assert who.rate is not None
        if self.shared is not None:
            return await self.shared.take(who.name, who.rate, who.burst)
        return self.local.take(who.name, who.rate, who.burst)

    @asynccontextmanager
    async def slot(self, who: Principal, route: str) -> AsyncIterator[None]:
        """Hold one in-flight slot of ``who`` for the block, or raise 503/429."""
        began, parent = time.monotonic(), tracing.context_now()
        if self.drain.draining:
            raise UnavailableError(
                "the server is shutting down; retry (another instance will answer)",
                code="shutting_down",
            )
        held = self.per_key[who.name]
        if who.max_in_flight is not None and held >= who.max_in_flight:
            raise OverloadedError(
                f"API key '{who.name}' has {held} requests in flight (its limit "
                f"{who.max_in_flight}); retry shortly",
                code="key_busy",
            )
        if self.in_flight >= self.max_in_flight:
            raise OverloadedError(
                f"{self.in_flight} requests in flight (limit {self.max_in_flight}); retry shortly"
            )
        # Reserved before the first await, so concurrent requests cannot all pass the checks.
        self.in_flight += 1
        self.per_key[who.name] += 1
        try:
            if who.rate is not None:
                wait = await self._take(who)
                if wait > 0:
                    raise RateLimitedError(
                        f"API key '{who.name}' is over its rate of {who.rate:g} requests/s "
                        f"(burst {who.burst}); retry after the Retry-After seconds",
                        retry_after_s=max(1, math.ceil(wait)),
                    )
            tracing.wait_span(
                "admission",
                parent,
                began,
                {"gainrag.key": who.name, "gainrag.in_flight": self.in_flight},
            )
            gauge = telemetry.IN_FLIGHT.labels(route)
            gauge.inc()
            try:
                yield
            finally:
                gauge.dec()
        finally:
            self.in_flight -= 1
            self.per_key[who.name] -= 1
            if not self.per_key[who.name]:
                del self.per_key[who.name]

    async def close(self) -> None:
        """Close the Redis client of the shared buckets."""
        if self.shared is not None:
            await self.shared.close()
