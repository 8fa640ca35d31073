"""OpenTelemetry tracing: one trace per request across the gateway, the workers and the LLM server.

Off by default (``GAINRAG_TRACING__EXPORTER=none``: the OpenTelemetry API's no-op tracer, a few
hundred nanoseconds a span). ``otlp`` exports to a collector over OTLP/HTTP (a batch processor,
off the request path); ``file`` writes each finished span as one JSON line (tests, debugging; a
``{service}`` in the path names the process).

Every process of the service sets up the same way (:func:`setup`, called where its app is made):
FastAPI server spans read the W3C ``traceparent`` of incoming requests, and outgoing httpx calls
(to the workers, the LLM server, Redis is not HTTP) carry it, so a worker's spans join the
gateway's trace. The pipeline's stages, the batchers' queue waits and the admission check are
spans of their own (:func:`span`, :func:`wait_span`). The trace id goes out in the
``X-Trace-ID`` response header and into the logs, beside the request id.

Only the OpenTelemetry API is imported at module level (it is small and pure Python): the SDK
and the exporters load in :func:`setup`, and only when tracing is on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gainrag.config import TracingSettings

log = logging.getLogger(__name__)

_TRACER_NAME = "gainrag"
_lock = threading.Lock()
_configured: str | None = None  # the service name tracing was set up for, once per process
_tracer: trace.Tracer | None = None

Attributes = Mapping[str, str | bool | int | float | Sequence[str]]


def tracer() -> trace.Tracer:
    """This process's tracer (the no-op one until :func:`setup` turned tracing on). Made once:
    the SDK builds a new Tracer object on every ``get_tracer`` call (6% of a traced request's
    CPU in the gateway benchmark)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(_TRACER_NAME)
    return _tracer


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return _configured is not None


def setup(settings: TracingSettings, service: str) -> None:
    """Turn tracing on for this process as ``service`` if the settings say so (idempotent: the
    first call wins; a test's second app in the same process keeps the first provider)."""
    global _configured
    if settings.exporter == "none":
        return
    with _lock:
        if _configured is not None:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        name = settings.service_name or f"gainrag-{service}"
        resource = Resource.create({"service.name": name, "service.namespace": "gainrag"})
        # ParentBased: a worker follows the gateway's decision, so a trace is whole or absent
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        if settings.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5))
            )
        else:
            from gainrag.tracing_file import JsonLinesExporter

            path = Path(str(settings.file).replace("{service}", service))
            # batched like OTLP (serialising stays off the request path), flushed twice a second
            processor = BatchSpanProcessor(JsonLinesExporter(path), schedule_delay_millis=500)
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        global _tracer
        _tracer = provider.get_tracer(_TRACER_NAME)
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
        _configured = name
        log.info("tracing on: %s spans of %s", settings.exporter, name)


def instrument_app(app: FastAPI) -> None:
    """Server spans for ``app``'s requests, continuing the caller's ``traceparent`` (only when
    tracing is on; probes and scrapes are left out: they would drown the traces)."""
    if _configured is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=trace.get_tracer_provider(),
        excluded_urls="health,ready,metrics",
        # one span per request, not one per ASGI send/receive message
        exclude_spans=["receive", "send"],
    )


def shutdown() -> None:
    """Flush and stop the exporter (at process exit; spans in a batch would be lost)."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


def context_now() -> otel_context.Context:
    """The current trace context (to parent a span that starts later, elsewhere)."""
    return otel_context.get_current()


def current_span() -> trace.Span:
    """The current span (a non-recording one when there is none)."""
    return trace.get_current_span()


def use_span(s: trace.Span) -> AbstractContextManager[trace.Span]:
    """Make ``s`` current inside a block without ending it on exit, and without marking it
    failed for what the block raises (the end of a stream, StopAsyncIteration, is an exception
    too): the caller marks real failures (:func:`mark_error`)."""
    return trace.use_span(
        s, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def mark_error(s: trace.Span, exc: BaseException) -> None:
    """Record ``exc`` on ``s`` and set its status to error."""
    s.record_exception(exc)
    s.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))


def current_trace_id() -> str | None:
    """The hex trace id of the current span, or None (no span, or tracing off)."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


@contextmanager
def span(name: str, attributes: Attributes | None = None) -> Iterator[trace.Span]:
    """A span around a block, the current one inside it (a child of the caller's). Exceptions
    are recorded on it and re-raised."""
    with tracer().start_as_current_span(name, attributes=attributes) as s:
        yield s


def wait_span(
    name: str,
    parent: otel_context.Context,
    start_monotonic: float,
    attributes: Attributes | None = None,
) -> None:
    """A finished span for a wait that began at ``start_monotonic`` (``time.monotonic()``) and
    ends now, under ``parent`` (the context captured where the wait began: a batcher's loop runs
    in its own task, not in the waiting request's)."""
    if _configured is None:
        return
    caller = trace.get_current_span(parent).get_span_context()
    if caller.is_valid and not caller.trace_flags.sampled:
        return  # the trace is not recorded: its child would not be either
    now_ns = time.time_ns()
    began_ns = now_ns - int((time.monotonic() - start_monotonic) * 1e9)
    s = tracer().start_span(name, context=parent, attributes=attributes, start_time=began_ns)
    s.end(end_time=now_ns)
