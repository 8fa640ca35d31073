"""The ``file`` span exporter of :mod:`gainrag.tracing`: finished spans as JSON lines.

Its own module because it needs the OpenTelemetry SDK, which :mod:`gainrag.tracing` loads only
when tracing is on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    """Each finished span as one line of JSON (the SDK's own ``to_json``) appended to ``path``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # line-buffered appends: a reader (a test) sees each span once it has ended
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append the spans."""
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            for s in spans:
                self._file.write(json.dumps(json.loads(s.to_json()), separators=(",", ":")) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Lines are written as spans end; nothing waits."""
        return True
