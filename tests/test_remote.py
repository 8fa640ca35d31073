"""Upstream's retry policy against a raw TCP server that drops connections on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gainrag.errors import UnavailableError, UpstreamError
from gainrag.upstream import Upstream, make_client

_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'


async def _serve(drops: int, reply: bytes = _OK) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that reads each request and closes the first ``drops`` connections without a
    response (what a keep-alive connection closed by a restarted server looks like), then
    answers ``reply``."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        await reader.readuntil(b"\r\n\r\n")
        if len(seen) > drops:
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", seen


@pytest.fixture
async def once_dropped() -> AsyncIterator[tuple[str, list[int]]]:
    async for s in _serve(drops=1):
        yield s


@pytest.fixture
async def always_dropped() -> AsyncIterator[tuple[str, list[int]]]:
    async for s in _serve(drops=10):
        yield s


async def test_a_dropped_connection_is_repeated_once(once_dropped: tuple[str, list[int]]) -> None:
    url, seen = once_dropped
    up = Upstream("worker", make_client(url, timeout_s=5), connect_retries=0)
    try:
        assert await up.request("GET", "/x") == {"ok": True}
        assert len(seen) == 2
    finally:
        await up.close()


async def test_a_connection_dropped_twice_is_502(always_dropped: tuple[str, list[int]]) -> None:
    url, seen = always_dropped
    up = Upstream("worker", make_client(url, timeout_s=5), connect_retries=0)
    try:
        with pytest.raises(UpstreamError) as info:
            await up.request("GET", "/x")
        assert info.value.status_code == 502 and info.value.code == "worker_error"
        assert len(seen) == 2  # one repeat, not a loop
    finally:
        await up.close()


async def test_an_upstream_503_is_a_503_down_not_a_502() -> None:
    # what llama-server answers while it loads the model after a restart
    body = b'{"error": {"code": 503, "message": "Loading model"}}'
    head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    reply = head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body
    async for url, _ in _serve(drops=0, reply=reply):
        up = Upstream("llm", make_client(url, timeout_s=5))
        try:
            with pytest.raises(UnavailableError) as info:
                await up.request("POST", "/chat/completions", {})
            assert info.value.status_code == 503 and info.value.code == "llm_down"
            assert "Loading model" in info.value.message
        finally:
            await up.close()
