"""The managed llama.cpp engine: llama.cpp's C++ ``llama-server`` started as a child process on
loopback, behind the same OpenAI-compatible client as a remote LLM server (one code path for the
embedded default and the distributed mode).

The server decodes up to ``parallel`` prompts together (its slots, continuous batching), so the
gateway just sends concurrent requests. It is started in its own process group with
``PR_SET_PDEATHSIG`` (it dies with the process that started it, even on SIGKILL), waited on until
``/health`` answers 200, and stopped by :meth:`LlamaServer.stop`. Prompt lengths are counted
locally with the GGUF's own tokenizer and chat template (the server's count, exactly; see
tests/test_llama_engine.py), so over-long prompts are still rejected before admission.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from gainrag.config import LLMSettings
from gainrag.errors import ConfigurationError, GainRAGError, OverloadedError, UnavailableError
from gainrag.llm.openai_backend import OpenAIGenerator
from gainrag.llm.prompts import neutralize_control_text
from gainrag.util import file_sha256

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# How long a failed request waits for the engine's process to show as exited before the failure
# counts as the upstream's own (502) rather than a dead engine (503): seconds, on error paths only.
EXIT_GRACE_S = 1.0
# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. The
# gateway builds its models in a worker thread (asyncio.to_thread), so the server is spawned from
# this one long-lived thread, which lives as long as the process.
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: process-group stop at close still applies
        pass


def _spawn(cmd: list[str], env: dict[str, str], log_file: Any) -> subprocess.Popen[bytes]:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="llama-engine-spawner")
    return _spawner.submit(
        subprocess.Popen,
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() takes every thread with it
        preexec_fn=_die_with_parent,
    ).result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def engine_key(binary: Path) -> str:
    """The build key of a llama-server binary (version + CPU flags, written by
    scripts/llama-server.sh next to it), or a digest of the binary when it has none."""
    key_file = binary.parent / "KEY"
    if key_file.is_file():
        return key_file.read_text().strip()
    return "sha256-" + file_sha256(binary)[:16]


def slot_context(settings: LLMSettings) -> int:
    """Tokens of KV cache per server slot: the longest prompt the gateway admits plus the longest
    reply (``engine_slot_ctx`` overrides it). docker/llama-cpu.Dockerfile bakes the same figure."""
    return settings.engine_slot_ctx or (
        settings.max_input_tokens
        + max(settings.max_new_tokens_pseudo, settings.max_new_tokens_answer)
    )


class LlamaServer:
    """One ``llama-server`` child process on 127.0.0.1."""

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        *,
        alias: str,
        port: int,
        parallel: int,
        slot_ctx: int,
        threads: int,
        log_path: Path,
    ) -> None:
        self.binary, self.gguf, self.alias, self.port = binary, gguf, alias, port
        self.parallel, self.slot_ctx, self.threads = parallel, slot_ctx, threads
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._reported = False

    def command(self) -> list[str]:
        """The command line (``--jinja``: the GGUF's own chat template, as the tokenizer that
        counts prompt tokens locally applies it; an explicit ``--parallel``: each slot gets
        ``slot_ctx`` tokens of its own KV cache)."""
        return [
            str(self.binary),
            "--model", str(self.gguf), "--alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.slot_ctx),
            "--threads", str(self.threads), "--threads-batch", str(self.threads),
            "--jinja", "--metrics", "--slots", "--no-webui",
            # No host-RAM prompt cache (8 GiB by default): each slot still reuses its own prefix.
            "--cache-ram", "0",
        ]  # fmt: skip

    def start(self, deadline_s: float) -> None:
        """Start the server and wait until it has loaded the model (``/health`` = 200)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # spinning OpenMP threads starve us
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n=== {time.ctime()} {' '.join(self.command())}\n".encode())
            log_file.flush()
            self.proc = _spawn(self.command(), env, log_file)
        log.info("llama-server pid %d on %s (log: %s)", self.proc.pid, self.url, self.log_path)
        end = time.monotonic() + deadline_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ConfigurationError(
                        f"llama-server exited with code {code} while loading {self.gguf.name}; "
                        f"see {self.log_path}: {self.log_tail()}",
                        code="llm_engine_failed",
                    )
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > end:
                    self.stop()
                    raise UnavailableError(
                        f"llama-server did not load {self.gguf.name} within {deadline_s:.0f} s "
                        f"(GAINRAG_LLM__ENGINE_STARTUP_S); see {self.log_path}",
                        code="llm_engine_timeout",
                    )
                time.sleep(0.1)

    def failure(self) -> str | None:
        """Why the server cannot answer (it exited), or None while it runs."""
        if self.proc is None:
            return "the llama.cpp engine is not started"
        code = self.proc.poll()
        if code is None:
            return None
        if not self._reported:
            self._reported = True
            log.error("llama-server exited with code %s; its log: %s", code, self.log_path)
        # No path in the message: readiness and error bodies are public.
        return f"the llama.cpp engine exited (code {code})"

    def log_tail(self, n: int = 1500) -> str:
        """The end of the server's log (for error messages at start-up)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - n))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM its process group, SIGKILL after ``grace_s``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self.proc = proc  # keep the exit code for failure()
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = proc


class LlamaCppGenerator:
    """A GGUF model served by a managed ``llama-server``: generation through
    :class:`OpenAIGenerator`, prompt lengths from the GGUF's tokenizer, 503 when the engine died."""

    def __init__(
        self,
        settings: LLMSettings,
        server: LlamaServer,
        tokenizer_dir: Path,
        *,
        version: str,
    ) -> None:
        from transformers import AutoTokenizer

        self.server = server
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._lock = threading.Lock()
        self.client = OpenAIGenerator(
            settings,
            base_url=server.url + "/v1",
            name=f"llamacpp:{settings.model}",
            version=version,
        )
        self.name, self.version = self.client.name, self.client.version
        # One request per server slot at a time: the rest wait here, in a bounded queue (429 when
        # full), not in llama-server's own queue, where waiting would count against the LLM
        # call's timeout (GAINRAG_LLM__TIMEOUT_S) and end as a 504 under load.
        self._slots = asyncio.Semaphore(settings.engine_parallel)
        self._waiting = 0
        self._max_queue = settings.max_queue

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of the server's slots (503 once the engine has died)."""
        reason = self.failure()
        if reason is not None:
            raise UnavailableError(reason, code="llm_down")
        if self._slots.locked() and self._waiting >= self._max_queue:
            raise OverloadedError(
                f"the LLM queue is full ({self._max_queue} prompts waiting for one of "
                f"{self.server.parallel} engine slots; GAINRAG_LLM__MAX_QUEUE)",
                code="llm_queue_full",
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        except GainRAGError as exc:
            # Killed mid-request: the client sees a dropped connection (502) or a refused one;
            # the cause is a dead engine: 503 with that reason, like any unreachable backend.
            reason = await self._failure_within(EXIT_GRACE_S)
            if reason is not None:
                raise UnavailableError(reason, code="llm_down") from exc
            raise
        finally:
            self._slots.release()

    @classmethod
    def start(
        cls,
        settings: LLMSettings,
        *,
        gguf: Path,
        tokenizer_dir: Path,
        gguf_sha256: str,
    ) -> LlamaCppGenerator:
        """Start the server for ``gguf`` and return the generator using it."""
        binary = settings.engine_bin
        if not os.access(binary, os.X_OK):
            raise ConfigurationError(
                f"no llama-server at {binary}; run `make llm-engine` (or set "
                "GAINRAG_LLM__BACKEND=transformers)",
                code="llm_engine_missing",
            )
        key = engine_key(binary)
        slot_ctx = slot_context(settings)
        server = LlamaServer(
            binary,
            gguf,
            alias=settings.model,
            port=_free_port(),
            parallel=settings.engine_parallel,
            slot_ctx=slot_ctx,
            threads=settings.engine_threads or usable_cores(),
            log_path=settings.models_dir / "logs" / f"llama-server-{Path(settings.model).name}.log",
        )
        # Cache keys and responses change with the weights and with the engine build.
        version = f"{gguf_sha256[:12]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        server.start(settings.engine_startup_s)
        try:
            return cls(settings, server, tokenizer_dir, version=version)
        except Exception:
            server.stop()
            raise

    def failure(self) -> str | None:
        """Why the engine cannot serve (its process exited), or None."""
        return self.server.failure()

    async def _failure_within(self, seconds: float) -> str | None:
        """``failure()``, waiting up to ``seconds`` for a dying process to be reapable: the
        kernel closes a killed process's sockets before its exit can be collected, so the
        dropped connection can reach us while ``poll()`` still says it runs."""
        deadline = time.monotonic() + seconds
        while (reason := self.failure()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return reason

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """Greedy reply to one user message (503 ``llm_down`` once the engine has died)."""
        async with self._slot():
            return await self.client.chat(message, max_new_tokens=max_new_tokens)

    async def stream(self, message: str, *, max_new_tokens: int) -> AsyncIterator[str]:
        """Greedy reply as text deltas; closing the iterator stops the slot's decoding."""
        async with self._slot():
            agen = self.client.stream(message, max_new_tokens=max_new_tokens)
            try:
                async for delta in agen:
                    yield delta
            finally:
                aclose = getattr(agen, "aclose", None)  # closes the HTTP response now
                if aclose is not None:
                    await aclose()

    def prompt_tokens(self, message: str) -> int:
        """Exact length of the chat-templated prompt the server will decode."""
        messages = [{"role": "user", "content": neutralize_control_text(message)}]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        # The template writes the control tokens as text; the tokenizer maps them to their ids
        # (as llama-server does), and adds no BOS of its own (the template has what it needs).
        with self._lock:  # a fast tokenizer is not re-entrant across threads
            return len(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    async def close(self) -> None:
        """Close the connection pool and stop the server."""
        try:
            await self.client.close()
        finally:
            self.server.stop()
