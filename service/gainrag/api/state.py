"""The gateway's per-app state: what the routes need, created once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from gainrag.api.admission import Admission
from gainrag.config import Settings
from gainrag.errors import UnavailableError
from gainrag.feedback import FeedbackLog
from gainrag.pipeline import Pipeline


@dataclass
class AppState:
    """Settings, admission, the pipeline once loaded (or why loading failed), and the feedback
    log while the app runs (None when feedback is off)."""

    settings: Settings
    admission: Admission
    pipeline: Pipeline | None = None
    load_error: str | None = None
    feedback: FeedbackLog | None = None

    def require_pipeline(self) -> Pipeline:
        """The pipeline, or 503 ``not_ready`` while it loads (``load_failed`` with the reason)."""
        if self.pipeline is None:
            if self.load_error is not None:
                raise UnavailableError(self.load_error, code="load_failed")
            raise UnavailableError("models are still loading; retry shortly", code="not_ready")
        return self.pipeline
