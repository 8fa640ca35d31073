"""Connection-level limits and the graceful drain, on a real server process and raw sockets.

The process is the real gateway app and server (:func:`gainrag.api.server.serve`, the same
uvicorn configuration as ``gainrag serve``) over a fake generator, so it starts in a second.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gainrag_harness import Service, free_port

LIMITS = {
    "GAINRAG_HTTP__HEADER_TIMEOUT_S": "1",
    "GAINRAG_HTTP__BODY_TIMEOUT_S": "1",
    "GAINRAG_HTTP__MAX_CONNECTIONS": "20",
    "GAINRAG_HTTP__MAX_HEADERS": "50",
}


def fake_gateway(log_dir: Path, name: str, env: dict[str, str]) -> Service:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.fake_gateway", "--port", str(port)]
    return Service(name, cmd, port, log_dir, env=env, probe="/ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = fake_gateway(tmp_path_factory.mktemp("limits"), "gateway", LIMITS).start(60)
    yield svc
    svc.stop()


def connect(svc: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=10)


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (or resets it)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def rss_kib(svc: Service) -> int:
    assert svc.proc is not None
    for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stalled_headers_are_cut_off(server: Service) -> None:
    for partial in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"):
        with connect(server) as s:
            s.sendall(partial)
            start = time.monotonic()
            reply = read_all(s)
        assert time.monotonic() - start < 3
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert b"connection: close" in reply


def test_idle_keep_alive_is_not_cut_by_the_header_timeout(server: Service) -> None:
    with connect(server) as s:
        for _ in range(2):  # one connection, idle longer than the 1 s header timeout in between
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):
                chunk = s.recv(65536)
                assert chunk, reply  # closed by the server
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 ")
            time.sleep(1.5)


def test_a_stalled_body_is_cut_off(server: Service) -> None:
    with connect(server) as s:
        s.sendall(
            b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"question": '
        )
        start = time.monotonic()
        reply = read_all(s)
    assert time.monotonic() - start < 3
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b'"code":"request_timeout"' in reply


def test_trickling_an_unread_body_does_not_hold_the_connection(server: Service) -> None:
    with connect(server) as s:
        # /health never reads the body; its bytes keep resetting uvicorn's keep-alive timer
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        reply = b""
        try:
            while time.monotonic() - start < 10:
                s.sendall(b"x")
                s.settimeout(0.3)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
    assert time.monotonic() - start < 4
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert b"HTTP/1.1 408 " in reply


def test_huge_headers_are_refused_at_once_and_not_held(server: Service) -> None:
    before = rss_kib(server)

    def send_20mb() -> tuple[float, bytes]:
        s = connect(server)
        start = time.monotonic()
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(320):  # 20 MiB, never finished: the attack that stalls
                s.sendall(b"a" * 65536)
        except OSError:
            pass  # the server closed on us: what we want
        reply = read_all(s)
        s.close()
        return time.monotonic() - start, reply

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: send_20mb(), range(10)))
    for elapsed, reply in results:
        assert elapsed < 5
        # the 431 is sent before the close; a reset can overtake it on the client side
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert any(r.startswith(b"HTTP/1.1 431 ") for _, r in results)
    assert rss_kib(server) - before < 32 * 1024
    assert httpx.get(server.url + "/health").status_code == 200


def test_too_many_headers_are_431(server: Service) -> None:
    with connect(server) as s:
        lines = b"".join(b"X-H%d: 1\r\n" % i for i in range(60))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 431 "), reply
    assert b"too many request headers" in reply
    r = httpx.get(server.url + "/health", headers={f"x-h{i}": "1" for i in range(40)})
    assert r.status_code == 200


def test_connections_over_the_cap_get_503(server: Service) -> None:
    held = [connect(server) for _ in range(20)]
    try:
        time.sleep(0.2)
        with connect(server) as s:
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        assert b"retry-after: 1" in reply
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.servers  # starts its own process
def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    svc = fake_gateway(tmp_path, "draining", {"GAINRAG_HTTP__DRAIN_S": "20"}).start(60)
    assert svc.proc is not None
    try:
        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["slow"] = httpx.post(
                svc.url + "/answer", json={"question": "sleep=3"}, timeout=30
            )

        thread = threading.Thread(target=slow)
        thread.start()
        for _ in range(100):  # until the slow one is admitted
            metrics = httpx.get(svc.url + "/metrics").text
            if 'gainrag_in_flight{route="/answer"} 1.0' in metrics:
                break
            time.sleep(0.05)
        os.kill(svc.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(svc.url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        assert ready.headers["connection"] == "close"
        late = httpx.post(svc.url + "/answer", json={"question": "late"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert httpx.get(svc.url + "/health").status_code == 200  # still live
        thread.join(30)
        assert result["slow"].status_code == 200, result["slow"].text
        assert svc.proc.wait(timeout=10) == 0
        assert "drained" in svc.log_path.read_text()
    finally:
        svc.stop()


@pytest.mark.servers  # starts its own process
def test_the_drain_has_a_deadline(tmp_path: Path) -> None:
    svc = fake_gateway(tmp_path, "deadline", {"GAINRAG_HTTP__DRAIN_S": "1"}).start(60)
    assert svc.proc is not None
    try:
        thread = threading.Thread(
            target=lambda: httpx.post(svc.url + "/answer", json={"question": "sleep=60"}),
            daemon=True,
        )
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(svc.proc.pid, signal.SIGTERM)
        svc.proc.wait(timeout=15)
        assert time.monotonic() - start < 6  # drain (1 s) + uvicorn's grace (2 s) + margin
        assert "drain deadline passed" in svc.log_path.read_text()
    finally:
        svc.stop()
