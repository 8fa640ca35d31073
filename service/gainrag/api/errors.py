"""Exception handlers: every error becomes ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gainrag.errors import GainRAGError

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, type_: str, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one error shape."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "code": code}}, status, headers=headers
    )


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def describe_validation(errors: list[Any]) -> tuple[int, str, str]:
    """Status, code and a message that says what to fix, from pydantic's error list."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, "invalid_json", "request body is not valid JSON: " + str(e.get("msg", ""))
    msgs = []
    code = "validation_error"
    for e in errors:
        where, kind = _loc(tuple(e.get("loc", ()))), e.get("type", "")
        if kind == "missing":
            msgs.append(f"'{where}' is required")
            code = "missing_field"
        elif kind == "extra_forbidden":
            msgs.append(f"unknown field '{where}'")
            code = "unknown_field"
        elif kind == "model_attributes_type" or kind == "dict_type":
            msgs.append('body must be a JSON object like {"question": "..."}')
        else:
            msgs.append(f"'{where}': {e.get('msg', 'invalid value')}")
    return 422, code, "; ".join(msgs) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and HTTP errors to the error shape.

    Unexpected exceptions become a 500 in :class:`RequestContextMiddleware`, with the request id.
    """

    @app.exception_handler(GainRAGError)
    async def _domain(request: Request, exc: GainRAGError) -> JSONResponse:
        headers = exc.headers
        if exc.status_code >= 500:
            log.warning(
                "request failed: %s (%s)",
                exc.message,
                exc.code,
                extra={"request_id": getattr(request.state, "request_id", None)},
            )
        return error_response(exc.status_code, exc.message, exc.type, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = describe_validation(list(exc.errors()))
        return error_response(status, message, "invalid_request_error", code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            code, message = "invalid_json", "request body is not valid UTF-8 JSON"
        return error_response(
            exc.status_code, message, "invalid_request_error", code, headers=exc.headers
        )
