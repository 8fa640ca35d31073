"""The domain exception hierarchy. The API maps each class to one HTTP status and one JSON shape:
``{"error": {"message": ..., "type": ..., "code": ...}}``.
"""

from __future__ import annotations


class GainRAGError(Exception):
    """Base of every error the service reports on purpose."""

    status_code = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers


class InvalidRequestError(GainRAGError):
    """The request cannot be parsed (e.g. invalid JSON)."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLargeError(GainRAGError):
    """The request body is larger than the configured limit."""

    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(GainRAGError):
    """The body was sent with a content type the endpoint does not parse (JSON only)."""

    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ValidationFailedError(GainRAGError):
    """The request parsed but a field is missing or out of range."""

    status_code = 422
    type = "invalid_request_error"
    code = "validation_error"


class AuthenticationError(GainRAGError):
    """A protected endpoint was called without the right credentials."""

    status_code = 401
    type = "authentication_error"
    code = "unauthorized"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        # RFC 6750: a 401 names the scheme the client should use.
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(GainRAGError):
    """The caller may not do this: an endpoint disabled by configuration, a revoked API key."""

    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFoundError(GainRAGError):
    """The named resource (a document) does not exist."""

    status_code = 404
    type = "not_found_error"
    code = "not_found"


class ConflictError(GainRAGError):
    """The request clashes with what is stored (a passage id another document already has)."""

    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class ClientClosedError(GainRAGError):
    """The client disconnected before the answer was ready; the work was cancelled."""

    status_code = 499  # nginx's convention; nobody is left to read it
    type = "client_closed_request"
    code = "client_closed_request"


class OverloadedError(GainRAGError):
    """A queue or the in-flight limit is full; the client should retry later."""

    status_code = 429
    type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class RateLimitedError(OverloadedError):
    """An API key spent its request budget; ``Retry-After`` says when the next token comes."""

    type = "rate_limit_error"
    code = "rate_limited"


class UpstreamError(GainRAGError):
    """A backend (model, worker, LLM server) failed while serving the request."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class UnavailableError(GainRAGError):
    """A backend is not loaded or not reachable."""

    status_code = 503
    type = "unavailable_error"
    code = "unavailable"


class UpstreamTimeoutError(GainRAGError):
    """A backend did not answer within its deadline."""

    status_code = 504
    type = "timeout_error"
    code = "timeout"


class ConfigurationError(GainRAGError):
    """Settings or files on disk are inconsistent (raised at start-up, not per request)."""

    code = "configuration_error"
