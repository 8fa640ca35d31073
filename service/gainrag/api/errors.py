"""Exception handlers: every error becomes ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gainrag.errors import GainRAGError, UnsupportedMediaTypeError

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


def is_json_media_type(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON (no header counts as JSON)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _body_error(errors: list[Any]) -> bool:
    return any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)


def _parse_failure(exc: BaseException) -> str:
    """What went wrong when FastAPI could not decode a body (it only says 'error parsing')."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse; send a flat JSON object"
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid UTF-8 JSON"
    return "request body could not be parsed as JSON"


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
        errors = list(exc.errors())
        content_type = request.headers.get("content-type")
        if _body_error(errors) and not is_json_media_type(content_type):
            # FastAPI hands a non-JSON body to validation as raw bytes, which would read as
            # "body must be a JSON object" even when it is one. JSON only, said plainly; no
            # text/plain parsing either: it would admit cross-site form posts without preflight.
            e = UnsupportedMediaTypeError(
                f"request body must be sent as Content-Type: application/json, not {content_type}"
            )
            return error_response(e.status_code, e.message, e.type, e.code)
        status, code, message = describe_validation(errors)
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
        headers = exc.headers
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, too deep)
            code, message = "invalid_json", _parse_failure(exc)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed(request)}
        return error_response(exc.status_code, message, "invalid_request_error", code, headers)


def _allowed(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the first route
    that matched the path, while a path served by several handlers (GET and POST on
    /v1/documents) allows all of theirs. Asked of the router itself, method by method, so routes
    inside included routers count too."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]
    return ", ".join(allowed)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
