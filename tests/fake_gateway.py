"""The real gateway (routes, auth, admission, limits, server) over a fake closed-book generator.

Tests of the HTTP layer need no models: the answer of a question is its text reversed, and a
question containing ``sleep=S`` takes S seconds. ``python -m tests.fake_gateway --port P`` runs it
as a real process through :func:`gainrag.api.server.serve`, with settings from ``GAINRAG_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import Any

from fastapi import FastAPI

from gainrag.api import create_app
from gainrag.api.server import serve
from gainrag.cache import Cache
from gainrag.config import Settings
from gainrag.logs import setup_logging
from gainrag.pipeline import Components

_SLEEP = re.compile(r"sleep=(\d+(?:\.\d+)?)")
CLOSED_BOOK = {"retrieve": False, "pseudo_passage": False, "select": False}


class FakeGenerator:
    """Answers with the prompt's question reversed; ``sleep=S`` in it takes S seconds."""

    name = "fake"
    version = "1"

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        self.calls += 1
        m = _SLEEP.search(message)
        if m:
            await asyncio.sleep(float(m.group(1)))
        return f"answer #{self.calls}"

    async def close(self) -> None:
        return None


class MemoryCache:
    """An in-memory stand-in for :class:`gainrag.cache.Cache` (same get/set/close)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    async def get(self, kind: str, key: str) -> Any | None:
        return self.data.get(key)

    async def set(self, kind: str, key: str, value: Any) -> None:
        self.data[key] = value

    async def close(self) -> None:
        return None


def fake_settings(**overrides: Any) -> Settings:
    """Closed-book settings (only the generator runs) with nested overrides."""
    base: dict[str, Any] = {"pipeline": dict(CLOSED_BOOK)}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings(**base)


def fake_app(
    settings: Settings, generator: FakeGenerator | None = None, cache: Any = None
) -> FastAPI:
    """The gateway app over the fake generator (and optionally a cache)."""
    return create_app(settings, Components(None, None, generator or FakeGenerator(), cache))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    settings = Settings(pipeline=CLOSED_BOOK)  # type: ignore[arg-type]
    setup_logging(settings.log_level)
    cache = Cache(settings.redis) if settings.redis.url else None
    serve(fake_app(settings, cache=cache), settings.http, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
