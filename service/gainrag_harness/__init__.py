"""One harness for tests, benchmarks and load tests: child processes with readiness probes
(redis-server, llama.cpp's server, gainrag's gateway and workers), free ports, question files and
the machine a measurement ran on. Installed with gainrag (a second top-level package of the same
distribution), so nothing needs to edit ``sys.path`` to import it.
"""

from gainrag.evaluation.machine import machine_info, machine_line
from gainrag.evaluation.questions import load_questions
from gainrag_harness.process import REQUIRED, Service, free_port, missing, running
from gainrag_harness.stack import (
    DEPENDENCIES,
    LLM_ALIAS,
    deployment,
    gainrag_service,
    llama_service,
    redis_service,
    smollm2_gguf,
)

__all__ = [
    "DEPENDENCIES",
    "LLM_ALIAS",
    "REQUIRED",
    "Service",
    "deployment",
    "free_port",
    "gainrag_service",
    "llama_service",
    "load_questions",
    "machine_info",
    "machine_line",
    "missing",
    "redis_service",
    "running",
    "smollm2_gguf",
]
