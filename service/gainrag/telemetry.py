"""Prometheus metrics of the gateway and the workers (one process-wide registry).

Every process serves them at ``GET /metrics``. Names are documented in the README; the Grafana
dashboard in ``deploy/grafana`` reads exactly these.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 1 ms (gateway overhead, cache hits) to 2 min (CPU generation).
_SECONDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 120,
)  # fmt: skip
_SIZES = (1, 2, 4, 8, 16, 32, 64, 101, 128, 202, 256, 512, 1024, 2048)

HTTP_SECONDS = Histogram(
    "gainrag_http_request_seconds",
    "HTTP request latency by route template, method and status.",
    ["route", "method", "status"],
    buckets=_SECONDS,
)
STAGE_SECONDS = Histogram(
    "gainrag_stage_seconds",
    "Wall time of one pipeline stage of one /answer request.",
    ["stage"],
    buckets=_SECONDS,
)
BATCH_QUEUE = Gauge(
    "gainrag_batch_queue_size", "Requests waiting in a dynamic batcher.", ["batcher"]
)
BATCH_REQUESTS = Histogram(
    "gainrag_batch_requests",
    "Requests packed into one model batch (one observation per batch run).",
    ["batcher"],
    buckets=_SIZES,
)
BATCH_COST = Histogram(
    "gainrag_batch_cost",
    "Cost units in one model batch: pairs (selector), queries (retriever), prompts (LLM).",
    ["batcher"],
    buckets=_SIZES,
)
BATCH_REJECTED = Counter(
    "gainrag_batch_rejected_total", "Requests refused with 429 (queue full).", ["batcher"]
)
BATCH_DROPPED = Counter(
    "gainrag_batch_dropped_total",
    "Requests dropped before reaching the model because their caller went away.",
    ["batcher"],
)
CACHE = Counter(
    "gainrag_cache_requests_total",
    "Cache lookups by kind (answer, pseudo) and result (hit, miss, error, skipped).",
    ["kind", "result"],
)
PSEUDO_SELECTED = Counter(
    "gainrag_pseudo_selected_total", "Answers whose selected passages include the pseudo-passage."
)
ANSWERS = Counter("gainrag_answers_total", "Answers returned, by source.", ["source"])
FALLBACKS = Counter(
    "gainrag_fallbacks_total",
    "Degraded answers by kind (retrieval_down, selector_down).",
    ["kind"],
)
UPSTREAM = Counter(
    "gainrag_upstream_requests_total",
    "Calls to remote workers and the LLM server by upstream and outcome.",
    ["upstream", "outcome"],
)
LLM_TOKENS = Counter(
    "gainrag_llm_generated_tokens_total",
    "Tokens decoded by the in-process generator (one per live row per decoding step); it stops "
    "moving when every caller of a batch went away.",
)
STREAMS = Counter(
    "gainrag_streams_total",
    "Streamed responses (/answer with SSE, /v1/chat/completions with stream) by outcome "
    "(complete, error, disconnected).",
    ["outcome"],
)
IN_FLIGHT = Gauge(
    "gainrag_in_flight", "Requests admitted and not yet answered, by route template.", ["route"]
)
INDEX_INFO = Gauge(
    "gainrag_index_passages", "Passages in the loaded index, labelled by version.", ["version"]
)

INGEST_PASSAGES = Counter(
    "gainrag_ingest_passages_total",
    "Passages added to or removed from the index through the documents API.",
    ["op"],
)
INGEST_DOCUMENTS = Counter(
    "gainrag_ingest_documents_total",
    "Documents posted, by what the write did (created, replaced, unchanged, deleted).",
    ["status"],
)
INGEST_QUEUE = Gauge(
    "gainrag_ingest_queue_size", "Document writes waiting for the index writer or running."
)
INGEST_SECONDS = Histogram(
    "gainrag_ingest_seconds",
    "Wall time of one document write, by stage (wait: for the writes before it; split, "
    "encode, commit, apply; total: the write itself).",
    ["stage"],
    buckets=_SECONDS,
)

FEEDBACK_RECORDS = Counter(
    "gainrag_feedback_records_total",
    "Served answers recorded for feedback, by outcome (recorded; dropped: the recording queue "
    "was full or closed; error: the store failed or is in an outage window).",
    ["outcome"],
)
FEEDBACK = Counter(
    "gainrag_feedback_total", "Feedback accepted by POST /v1/feedback, by rating.", ["rating"]
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
