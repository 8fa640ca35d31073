"""Graceful drain state shared by an app, its middleware and the server that runs it."""

from __future__ import annotations

import time


class Drain:
    """Whether the process is draining, and how many requests (not probes) are in flight.

    The server flips ``draining`` on SIGTERM; ``/ready`` then answers 503 so the load balancer
    stops sending traffic, new work is refused with 503, and the server exits once ``active``
    reaches zero or the drain deadline passes.
    """

    def __init__(self) -> None:
        self.draining = False
        self.active = 0
        self.since: float | None = None

    def begin(self) -> None:
        """Start draining (idempotent)."""
        if not self.draining:
            self.draining = True
            self.since = time.monotonic()
