"""Edits of an app's OpenAPI schema: the limits its handlers enforce, and no bearer scheme while
authentication is off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI


def patch_openapi(app: FastAPI, patch: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``patch`` to the app's OpenAPI schema once, when it is first built."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI caches it in app.openapi_schema: patched once
        patch(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def declare_limits(app: FastAPI, limits: dict[str, dict[str, Any]]) -> None:
    """State in the app's OpenAPI schema the limits its handlers enforce themselves.

    The handlers check configured limits (query length, documents per request) with error codes
    of their own (``too_many_documents``...); declaring them too lets a client, or a schema-driven
    fuzzer, know what is accepted before it is refused. ``limits`` maps ``"Model.field"`` (or
    ``"Model.field[]"``, the items of a list) to JSON-schema keywords.
    """

    def patch(schema: dict[str, Any]) -> None:
        models = schema["components"]["schemas"]
        for where, keywords in limits.items():
            model, _, name = where.partition(".")
            node = models[model]["properties"][name.removesuffix("[]")]
            node = node["items"] if name.endswith("[]") else node
            # An optional field is anyOf [its type, null]: the bounds belong to its type.
            for branch in node.get("anyOf", [node]):
                if branch.get("type") != "null":
                    branch.update(keywords)

    patch_openapi(app, patch)


def hide_security(app: FastAPI) -> None:
    """Drop the bearer scheme from the schema while authentication is off.

    The dependency that checks keys is always there (it lets everyone through when none are
    configured); a schema that still asked for a key would tell clients, and fuzzers, otherwise.
    """

    def patch(schema: dict[str, Any]) -> None:
        schema.get("components", {}).pop("securitySchemes", None)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)

    patch_openapi(app, patch)
