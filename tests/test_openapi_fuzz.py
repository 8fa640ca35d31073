"""Schemathesis against each process's own ``/openapi.json``: generated requests (valid and
invalid) to every operation, with all of schemathesis's checks: no 5xx, responses that match the
documented schema and status codes, schema-valid input accepted, invalid input rejected with a 4xx.

The workers and the gateway run as real processes on loopback (their batchers live on their own
event loops), on the small test index. The gateway answers with the real models, so it gets few
examples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Service, free_port, gainrag_service

ADMIN_TOKEN = "fuzz-admin-token"
CONFIG = Path(__file__).with_name("schemathesis.toml")  # the documented exceptions to the checks
# Enough for the boundary values schemathesis derives from the schema plus random cases, within
# a bounded run time on 2 CPU cores.
WORKER_EXAMPLES = 30
GATEWAY_EXAMPLES = 5


def _worker(kind: str, index_dir: Path, logs: Path, **env: str) -> Service:
    common = {"GAINRAG_RETRIEVAL__INDEX_DIR": str(index_dir), "GAINRAG_LOG_LEVEL": "WARNING"}
    return gainrag_service(kind, ["worker", kind], free_port(), logs, {**common, **env})


@pytest.fixture(scope="module")
def processes(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path, llm_dir: Path
) -> Iterator[dict[str, Service]]:
    logs = tmp_path_factory.mktemp("fuzz")
    retriever = _worker("retrieval", index_dir, logs, GAINRAG_WORKER__ADMIN_TOKEN=ADMIN_TOKEN)
    selector = _worker("selector", index_dir, logs)
    # The gateway with the real models: remote retrieval and selection, SmolLM2 in-process.
    gateway = gainrag_service(
        "gateway",
        ["serve"],
        free_port(),
        logs,
        {
            "GAINRAG_LOG_LEVEL": "WARNING",
            "GAINRAG_RETRIEVAL__URL": retriever.url,
            "GAINRAG_RETRIEVAL__K": "5",
            "GAINRAG_SELECTOR__URL": selector.url,
            "GAINRAG_LLM__MAX_NEW_TOKENS_PSEUDO": "8",
            "GAINRAG_LLM__MAX_NEW_TOKENS_ANSWER": "4",
        },
    )
    services = {"retrieval": retriever, "selector": selector, "gateway": gateway}
    try:
        for s in services.values():
            s.launch()
        for s in services.values():
            s.wait_up()
        yield services
    except BaseException:
        for s in services.values():
            print(f"--- {s.name} log ---\n{s.tail()}")
        raise
    finally:
        for s in services.values():
            s.stop()


def schemathesis_run(service: Service, examples: int, tmp_path: Path, *args: str) -> None:
    """``schemathesis run`` with every check against the service's ``/openapi.json``; fail with
    its report unless it found nothing."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(exe), "--config-file", str(CONFIG), "run", service.url + "/openapi.json",
        "--checks", "all",
        "--max-examples", str(examples), "--seed", "1", "--workers", "1",
        "--request-timeout", "120", "--suppress-health-check", "all",
        "--report", "junit", "--report-dir", str(tmp_path), *args,
    ]  # fmt: skip
    # CLI, not the pytest plugin: its lazy fixture loader uses pytest internals that pytest 9
    # removed. A fixed seed makes a failure reproducible with the same command.
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ}
    )
    assert run.returncode == 0, (
        f"{' '.join(cmd)}\n{run.stdout[-12000:]}\n{run.stderr[-3000:]}\n"
        f"--- {service.name} log ---\n{service.tail(3000)}"
    )


def test_retrieval_worker_openapi(processes: dict[str, Service], tmp_path: Path) -> None:
    # The admin token is a credential, not something the schema can generate.
    auth = f"Authorization: Bearer {ADMIN_TOKEN}"
    schemathesis_run(processes["retrieval"], WORKER_EXAMPLES, tmp_path, "--header", auth)


def test_selector_worker_openapi(processes: dict[str, Service], tmp_path: Path) -> None:
    schemathesis_run(processes["selector"], WORKER_EXAMPLES, tmp_path)


# What it finds on this branch (gateway input validation is being reworked on another branch),
# each a schema-valid request refused or failed: "" or whitespace-only questions (422
# empty_question: no minLength/pattern in the schema), questions over 1000 characters (422
# question_too_long: no maxLength), top_n 0 or 11 (422: no minimum/maximum), top_n 2.0 (422:
# JSON Schema's integer), a lone surrogate "\ud800" (502 pseudo_failed, should be 422).
# gainrag.api.fields has the workers' answers to each (Text, PositiveJsonInt, declare_limits).
@pytest.mark.xfail(
    strict=False,
    reason="gateway schema does not state its validation (empty/long questions, top_n bounds, "
    "integral floats) and a lone surrogate is a 502; fixed by the input-validation branch",
)
def test_gateway_openapi(processes: dict[str, Service], tmp_path: Path) -> None:
    schemathesis_run(processes["gateway"], GATEWAY_EXAMPLES, tmp_path)
