"""One trace per request across real processes: the gateway, both workers and the LLM server.

Every process exports its finished spans to a file of its own (``GAINRAG_TRACING__EXPORTER=file``);
the test sends ``/answer`` with a ``traceparent`` of its own and checks the spans of all three
files: one trace, the parent of every span, and the attributes an operator reads.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from gainrag_harness import DEPENDENCIES, Service, deployment, gainrag_service, running

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def stack_services(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path
) -> Iterator[tuple[dict[str, Service], Path]]:
    """The split deployment (redis, llama-server, both workers, gateway), every gainrag process
    writing its spans to ``<dir>/<service>.jsonl``."""
    logs = tmp_path_factory.mktemp("traced")
    spans = logs / "spans"
    with pytest.MonkeyPatch.context() as mp:
        # os.environ reaches every process the harness starts (workers and gateway alike)
        mp.setenv("GAINRAG_TRACING__EXPORTER", "file")
        mp.setenv("GAINRAG_TRACING__FILE", str(spans / "{service}.jsonl"))
        services = deployment(logs, index_dir, {"GAINRAG_RETRIEVAL__K": "5"})
    with running(services, order=DEPENDENCIES):
        yield services, spans


@pytest.fixture(scope="module")
def traced(stack_services: tuple[dict[str, Service], Path]) -> tuple[Service, Path]:
    services, spans = stack_services
    return services["gateway"], spans


def read_spans(
    directory: Path, trace_id: str, want: set[str], timeout_s: float = 20
) -> list[dict[str, Any]]:
    """The spans of ``trace_id`` in every file of ``directory``, once every name in ``want`` is
    among them (a server span ends just after its response is sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = []
        for path in directory.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if span["context"]["trace_id"] == f"0x{trace_id}":
                    span["service"] = span["resource"]["attributes"]["service.name"]
                    out.append(span)
        if want <= {s["name"] for s in out} or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def one(spans: list[dict[str, Any]], name: str, service: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and s["service"] == service]
    assert len(found) == 1, (name, service, [(s["name"], s["service"]) for s in spans])
    return found[0]


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]


def test_one_request_is_one_trace_across_the_processes(traced: tuple[Service, Path]) -> None:
    gateway, directory = traced
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(
        f"{gateway.url}/answer",
        json={"question": "who got the first nobel prize in physics"},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "cache-control": "no-cache"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-trace-id"] == trace_id
    want = {"POST /answer", "POST /retrieve", "POST /rerank", "retrieve", "generate"}
    spans = read_spans(directory, trace_id, want)
    assert {s["context"]["trace_id"] for s in spans} == {f"0x{trace_id}"}
    assert {s["service"] for s in spans} == {
        "gainrag-gateway",
        "gainrag-retrieval",
        "gainrag-selector",
    }

    # the gateway's request span continues the caller's trace and carries the answer's facts
    root = one(spans, "POST /answer", "gainrag-gateway")
    assert root["parent_id"] == f"0x{parent_id}" and root["kind"] == "SpanKind.SERVER"
    attrs = root["attributes"]
    assert attrs["gainrag.k"] == 5 and attrs["gainrag.top_n"] == 1
    assert attrs["gainrag.candidates"] == 6  # k + the pseudo-passage (on in the tests' env)
    assert attrs["gainrag.cache_hit"] is False and attrs["gainrag.degraded"] == []
    assert attrs["gainrag.selected"] == [p["id"] for p in r.json()["passages"]]
    assert attrs["gainrag.model.index_version"] == r.json()["models"]["index_version"]

    # every stage is a child of the request span
    stages = {s["name"]: s for s in children(spans, root)}
    expected = {"admission", "retrieve", "pseudo", "select_retrieved", "select_pseudo", "generate"}
    assert expected <= set(stages), set(stages)
    generate = stages["generate"]
    assert generate["attributes"]["gainrag.answer_chars"] == len(r.json()["answer"])
    assert generate["status"]["status_code"] == "UNSET"  # the reply's end is not an error
    assert stages["admission"]["attributes"]["gainrag.key"] == "anonymous"

    # a stage's call to a worker: the gateway's client span under the stage, the worker's
    # server span under that, the worker's queue wait under its server span
    for stage, route, service, batcher in (
        ("retrieve", "POST /retrieve", "gainrag-retrieval", "retriever"),
        ("select_retrieved", "POST /rerank", "gainrag-selector", "selector"),
        ("select_pseudo", "POST /rerank", "gainrag-selector", "selector"),
    ):
        (client,) = [s for s in children(spans, stages[stage]) if s["kind"] == "SpanKind.CLIENT"]
        (server,) = children(spans, client)
        assert (server["name"], server["service"], server["kind"]) == (
            route,
            service,
            "SpanKind.SERVER",
        )
        (queue,) = [s for s in children(spans, server) if s["name"].startswith("queue ")]
        assert queue["name"] == f"queue {batcher}" and queue["service"] == service
        assert queue["attributes"]["gainrag.batch.size"] >= 1
    # the LLM server's call is a child of generate (llama-server reads traceparent but exports
    # no spans of its own: the client span is its part of the trace)
    llm_calls = [s for s in children(spans, generate) if s["kind"] == "SpanKind.CLIENT"]
    assert llm_calls and all("/v1/chat/completions" in str(s["attributes"]) for s in llm_calls)
    # every span's parent is in the trace, but the caller's
    ids = {s["context"]["span_id"] for s in spans}
    assert all(s["parent_id"] in ids for s in spans if s is not root)


def test_a_cache_hit_is_traced_as_one(traced: tuple[Service, Path]) -> None:
    gateway, directory = traced
    q = {"question": "when was the eiffel tower built"}
    assert httpx.post(f"{gateway.url}/answer", json=q, timeout=300).status_code == 200
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        f"{gateway.url}/answer",
        json=q,
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        timeout=300,
    )
    assert r.status_code == 200 and r.json()["cached"] is True
    spans = read_spans(directory, trace_id, {"POST /answer", "cache"})
    root = one(spans, "POST /answer", "gainrag-gateway")
    assert root["attributes"]["gainrag.cache_hit"] is True
    cache = one(spans, "cache", "gainrag-gateway")
    assert cache["parent_id"] == root["context"]["span_id"]
    assert cache["attributes"]["gainrag.cache_hit"] is True
    assert not [s for s in spans if s["service"] != "gainrag-gateway"]  # no worker was asked


def test_an_unsampled_caller_gets_no_spans(traced: tuple[Service, Path]) -> None:
    gateway, directory = traced
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        f"{gateway.url}/answer",
        json={"question": "who wrote hamlet", "top_n": 1},
        headers={
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00",
            "cache-control": "no-cache",
        },
        timeout=300,
    )
    assert r.status_code == 200
    # the decision follows the caller's flag (ParentBased): nothing recorded, anywhere
    assert read_spans(directory, trace_id, {"never"}, timeout_s=2) == []


class _Collector(BaseHTTPRequestHandler):
    """OTLP/HTTP's receiving end: decodes each ExportTraceServiceRequest (protobuf, the
    protocol's own message types) and keeps its spans' names and trace ids."""

    received: ClassVar[list[tuple[str, str, str]]] = []

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = next(
                a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
            )
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.received.append((service, sp.name, sp.trace_id.hex()))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(b"")

    def log_message(self, *_: object) -> None:
        pass


def test_otlp_export_reaches_a_collector(
    stack_services: tuple[dict[str, Service], Path], tmp_path: Path
) -> None:
    """A gateway with GAINRAG_TRACING__EXPORTER=otlp sends its spans over OTLP/HTTP to the
    endpoint (path /v1/traces appended); what is still batched goes out at shutdown."""
    services, _ = stack_services
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(services["gateway"].env)
    env.update(
        {
            "GAINRAG_TRACING__EXPORTER": "otlp",
            "GAINRAG_TRACING__ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            "GAINRAG_TRACING__SERVICE_NAME": "gateway-under-test",
        }
    )
    gateway = gainrag_service("otlp-gateway", ["serve"], tmp_path, env, threads=1)
    trace_id = secrets.token_hex(16)
    with gateway:
        r = httpx.post(
            f"{gateway.url}/answer",
            json={"question": "who painted the mona lisa"},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            timeout=300,
        )
        assert r.status_code == 200, r.text
    # stopped (SIGTERM): the batch processor flushed on the way out
    server.shutdown()
    got = {(svc, name) for svc, name, tid in _Collector.received if tid == trace_id}
    assert {("gateway-under-test", "POST /answer"), ("gateway-under-test", "generate")} <= got
