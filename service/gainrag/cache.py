"""Redis cache of answers and pseudo-passages, which never makes a request fail.

A :class:`~gainrag.cache_interface.CacheStore` (keys: :func:`gainrag.cache_interface.cache_key`).
Every call has a bounded budget (``timeout_ms``): a down or slow Redis costs at most that, the
request is answered without the cache, the failure is logged once and counted, and for ``retry_s``
afterwards the cache is skipped outright so a dead Redis does not add its timeout to every
request. The first call after that window is a probe: success logs the recovery.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from gainrag import telemetry
from gainrag.config import RedisSettings
from gainrag.redis_conn import Outage, bounded_client

log = logging.getLogger(__name__)


class Cache:
    """Get/set JSON values in Redis within a time budget; failures degrade to a miss."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.timeout_s = settings.timeout_ms / 1000.0
        self.client = bounded_client(settings)
        self.outage = Outage("cache", settings.retry_s, log)

    def _skip(self, kind: str) -> bool:
        if self.outage.skipping():
            telemetry.CACHE.labels(kind, "skipped").inc()
            return True
        return False

    def _failed(self, kind: str, op: str, exc: BaseException) -> None:
        telemetry.CACHE.labels(kind, "error").inc()
        self.outage.failed(exc, f"{kind} {op}")

    def _ok(self) -> None:
        self.outage.ok()

    async def get(self, kind: str, key: str) -> Any | None:
        """The cached value, or None on a miss, an error or while the cache is skipped."""
        if self._skip(kind):
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.client.get(self.settings.prefix + key)
        except Exception as exc:  # ConnectionError, TimeoutError, protocol errors: all a miss
            self._failed(kind, "get", exc)
            return None
        self._ok()
        if raw is None:
            telemetry.CACHE.labels(kind, "miss").inc()
            return None
        try:
            value = json.loads(raw)
        except ValueError:  # written by an incompatible version: treat as a miss
            telemetry.CACHE.labels(kind, "miss").inc()
            return None
        telemetry.CACHE.labels(kind, "hit").inc()
        return value

    async def set(self, kind: str, key: str, value: Any) -> None:
        """Store a value with the configured TTL; failures are counted, never raised."""
        if self._skip(kind):
            return
        data = json.dumps(value, ensure_ascii=False).encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.set(self.settings.prefix + key, data, ex=self.settings.ttl_s)
        except Exception as exc:
            self._failed(kind, "set", exc)
            return
        self._ok()

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
