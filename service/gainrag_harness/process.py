"""Child processes on loopback ports, waited on until a readiness probe answers.

A missing binary is reported by :func:`missing`: inside a test it skips the test, or fails it
under ``GAINRAG_REQUIRE_SERVICES=1`` (``make test``: CI cannot go green without exercising the
real services); outside pytest (benchmarks, load tests) it exits with the message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx

from gainrag.config import REPO_ROOT

REQUIRED = os.environ.get("GAINRAG_REQUIRE_SERVICES") == "1"


def missing(what: str, how: str) -> NoReturn:
    """Skip the running test (fail it under ``GAINRAG_REQUIRE_SERVICES=1``), or exit outside
    pytest, because ``what`` is not installed; ``how`` says how to install it."""
    message = f"{what} is not installed ({how})"
    # pytest sets this variable while a test (or its fixtures) runs: skipping is only
    # meaningful there, and the harness must not need pytest installed to start a benchmark.
    if "PYTEST_CURRENT_TEST" in os.environ:
        import pytest

        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    raise SystemExit(message)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """One child process with a log file, waited on until an HTTP (or TCP) probe answers.

    Also a context manager: ``with Service(...) as s`` starts it and stops it on the way out.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        port: int,
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        probe: str | None = "/health",
        scheme: str = "http",
        timeout_s: float = 180.0,
    ) -> None:
        self.name, self.cmd, self.port, self.probe = name, list(cmd), port, probe
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.scheme, self.timeout_s = scheme, timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL (``redis://…`` for Redis, else ``http://…``)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float | None = None) -> Service:
        """Start and wait until the probe answers 200 (or the port accepts, without a probe)."""
        return self.launch().wait_up(timeout_s)

    def launch(self) -> Service:
        """Start the process without waiting (several services can then load side by side)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        return self

    def wait_up(self, timeout_s: float | None = None) -> Service:
        """Wait until the launched process answers its probe."""
        assert self.proc is not None, "launch() first"
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; log:\n{self.tail()}")
            if self._up():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not up in {timeout_s} s; log:\n{self.tail()}")

    def _up(self) -> bool:
        try:
            if self.probe is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            url = f"http://127.0.0.1:{self.port}{self.probe}"
            return httpx.get(url, timeout=2.0).status_code == 200
        except (OSError, httpx.HTTPError):
            return False

    def kill(self) -> None:
        """SIGKILL: the crash a fallback must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: a process that hangs with its sockets open (connections queue, nothing
        answers), the fault a deadline must bound."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 4000) -> str:
        """The end of the log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@contextmanager
def running(services: dict[str, Service], order: Sequence[str] = ()) -> Iterator[None]:
    """Start ``services`` and stop them all (in reverse) on the way out.

    The ones named in ``order`` are launched side by side and waited on before the rest start,
    one at a time in their dict order (dependencies first: loading them in parallel is most of a
    stack's start-up). On a failure every service's log tail is printed before re-raising.
    """
    try:
        for name in order:
            services[name].launch()
        for name in order:
            services[name].wait_up()
        for name, svc in services.items():
            if name not in order:
                svc.start()
        yield
    except BaseException:
        for s in services.values():
            print(f"--- {s.name} log ---\n{s.tail()}")
        raise
    finally:
        for s in reversed(list(services.values())):
            s.stop()
