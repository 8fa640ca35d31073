"""HTTP gateway: ``create_app(settings)``."""

from gainrag.api.app import create_app

__all__ = ["create_app"]
