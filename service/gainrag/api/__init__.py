"""HTTP servers: the gateway (``create_app(settings)``) and, in :mod:`gainrag.api.workers`, the
retrieval and selector workers.

``create_app`` is imported on first use: a worker process imports this package too, and must
not load the gateway's routes, pipeline and cache with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gainrag.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from gainrag.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
