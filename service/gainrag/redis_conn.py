"""What every Redis user in gainrag shares: a client with one bounded attempt per call, and the
outage window that skips Redis for ``retry_s`` after a failure (logged once, recovery too).

Redis is an accelerator here (cache, shared rate limits), never a dependency a request may fail
on: each caller answers without it while it is down.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis

from gainrag.config import RedisSettings


def bounded_client(settings: RedisSettings) -> Redis:
    """A client whose every call gives up within ``timeout_ms`` (no retries inside redis-py)."""
    if not settings.url:
        raise ValueError("this needs GAINRAG_REDIS__URL")
    timeout_s = settings.timeout_ms / 1000.0
    return Redis.from_url(
        settings.url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        decode_responses=False,
    )


class Outage:
    """After a failure, skip Redis for ``retry_s``; the first call after that is a probe.

    ``what`` names the feature in the two log lines ("cache", "shared rate limits (Redis)").
    """

    def __init__(self, what: str, retry_s: float, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger  # the user's logger: its outage lines read as its own
        self.retry_s = retry_s
        self.down = False
        self._until = 0.0

    def skipping(self) -> bool:
        """True while a recent failure says not to try Redis yet."""
        return self.down and time.monotonic() < self._until

    def failed(self, exc: BaseException, detail: str = "") -> None:
        """Record a failure: log it if it starts an outage, and skip Redis for ``retry_s``."""
        if not self.down:  # once per outage, not once per request
            self.log.warning(
                "%s unavailable (%s%s); going on without it, retrying in %g s",
                self.what,
                f"{detail}: " if detail else "",
                type(exc).__name__,
                self.retry_s,
            )
        self.down = True
        self._until = time.monotonic() + self.retry_s

    def ok(self) -> None:
        """Record a success; logs the recovery after an outage."""
        if self.down:
            self.log.info("%s available again", self.what)
        self.down = False
