"""HTTP plumbing shared by the clients of remote workers and of the LLM server.

One pooled ``httpx.AsyncClient`` per upstream, created once; each call carries the request id,
retries connect errors (nothing reached the server) and, once, a connection that dropped before
the response (a stale keep-alive connection; the calls are pure, so a repeat is safe), and maps
failures onto the domain errors:

- cannot connect (after retries), or a 503 from upstream (loading, starting) ->
  :class:`UnavailableError` (503, ``<name>_down``)
- deadline passed -> :class:`UpstreamTimeoutError` (504)
- 429 from upstream -> :class:`OverloadedError` (429)
- 422 whose code says the input text was refused -> :class:`ValidationFailedError` (422)
- any other non-2xx or a malformed body -> :class:`UpstreamError` (502)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from pydantic import ValidationError

from gainrag import telemetry
from gainrag.errors import (
    GainRAGError,
    OverloadedError,
    UnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
    ValidationFailedError,
)
from gainrag.logs import request_id_var

log = logging.getLogger(__name__)
# The connection went away under a request (not a timeout, not a refusal).
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def make_client(
    base_url: str,
    *,
    timeout_s: float,
    max_connections: int = 64,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """A pooled client for one upstream (keep-alive connections are reused across requests)."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers=headers,
    )


class Upstream:
    """A named upstream service: JSON calls with the error policy above."""

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        *,
        connect_retries: int = 2,
        uuid_request_ids_only: bool = False,
    ) -> None:
        self.name = name
        self.client = client
        self.connect_retries = connect_retries
        # llama-cpp-python's server answers 400 to an X-Request-ID that is not a UUID (vLLM
        # takes any); the gateway's own ids are UUIDs, a client's free-form id is not forwarded.
        self.uuid_request_ids_only = uuid_request_ids_only

    @property
    def base_url(self) -> str:
        """Where it is."""
        return str(self.client.base_url)

    def _headers(self) -> dict[str, str]:
        headers = {}
        rid = request_id_var.get()
        if rid and (not self.uuid_request_ids_only or _is_uuid(rid)):
            headers["x-request-id"] = rid  # one id across gateway and worker logs
        return headers

    async def _send(
        self, method: str, path: str, payload: dict[str, Any] | None, *, stream: bool = False
    ) -> httpx.Response:
        """Send one request with the retry policy; map transport failures to domain errors."""
        headers = self._headers()
        attempt, dropped = 0, False
        while True:
            try:
                request = self.client.build_request(method, path, json=payload, headers=headers)
                return await self.client.send(request, stream=stream)
            except httpx.ConnectError as exc:  # nothing reached the server: safe to retry
                if attempt < self.connect_retries:
                    attempt += 1
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                telemetry.UPSTREAM.labels(self.name, "unavailable").inc()
                raise UnavailableError(
                    f"the {self.name} at {self.base_url} is unreachable", code=f"{self.name}_down"
                ) from exc
            except _DROPPED as exc:
                # The connection closed before a response: mostly a pooled keep-alive connection
                # that the server had closed (idle timeout, restart, crash). Every upstream call
                # is a pure function of its input (retrieval, scoring, greedy generation), so one
                # repeat on a fresh connection is safe: it finds the server back, or reports it
                # down (503), where the stale connection alone would have made a 502.
                if not dropped:
                    dropped = True
                    telemetry.UPSTREAM.labels(self.name, "dropped").inc()
                    continue
                raise self.transport_error(exc) from exc
            except httpx.HTTPError as exc:  # timeouts, protocol errors
                raise self.transport_error(exc) from exc

    def transport_error(self, exc: httpx.HTTPError) -> UpstreamError | UpstreamTimeoutError:
        """The domain error for a transport failure once the request was sent (also mid-body)."""
        if isinstance(exc, httpx.TimeoutException):
            telemetry.UPSTREAM.labels(self.name, "timeout").inc()
            return UpstreamTimeoutError(
                f"the {self.name} at {self.base_url} did not answer in time",
                code=f"{self.name}_timeout",
            )
        telemetry.UPSTREAM.labels(self.name, "error").inc()
        return UpstreamError(
            f"the {self.name} at {self.base_url} failed: {type(exc).__name__}",
            code=f"{self.name}_error",
        )

    def _check_status(self, resp: httpx.Response) -> None:
        """Raise the domain error of a non-2xx response (its body must have been read)."""
        if resp.status_code == 429:
            telemetry.UPSTREAM.labels(self.name, "overloaded").inc()
            raise OverloadedError(f"the {self.name} is overloaded; retry shortly")
        if resp.status_code == 422 and _error_code(resp) in INPUT_ERROR_CODES:
            # The worker refused the text itself (the gateway checks the same rules, so this
            # is rare): the client's input, a 422 here too, not a dependency failure.
            telemetry.UPSTREAM.labels(self.name, "rejected_input").inc()
            raise ValidationFailedError(
                f"the {self.name} rejected the input: {_error_message(resp)}",
                code=str(_error_code(resp)),
            )
        if resp.status_code == 503:
            # The server is up but cannot serve yet (llama-server while it loads the model after
            # a restart, vLLM while it starts): the same 503 as an unreachable one, not a 502.
            telemetry.UPSTREAM.labels(self.name, "unavailable").inc()
            raise UnavailableError(
                f"the {self.name} at {self.base_url} is not ready: {_error_message(resp)}",
                code=f"{self.name}_down",
            )
        if resp.status_code >= 400:
            telemetry.UPSTREAM.labels(self.name, f"http_{resp.status_code}").inc()
            detail = _error_message(resp)
            log.warning("%s answered %d: %s", self.name, resp.status_code, detail)
            raise UpstreamError(
                f"the {self.name} answered HTTP {resp.status_code}: {detail}",
                code=f"{self.name}_error",
            )

    async def request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        client_errors: bool = False,
    ) -> dict[str, Any]:
        """Send one JSON request; return the JSON object of a 2xx response.

        ``client_errors``: the upstream's 400, 404, 409, 413 and 422 are the caller's own mistake
        (a proxied request, such as the documents API's): raised with its status, code and
        message instead of a 502."""
        resp = await self._send(method, path, payload)
        if client_errors and (
            resp.status_code in _CLIENT_ERRORS
            or (resp.status_code == 503 and _error_code(resp) in _PASSED_503)
        ):
            raise ProxiedClientError(
                resp.status_code, _error_message(resp), _error_code(resp) or "invalid_request"
            )
        self._check_status(resp)
        try:
            body = resp.json()
        except ValueError as exc:
            telemetry.UPSTREAM.labels(self.name, "bad_response").inc()
            raise UpstreamError(
                f"the {self.name} sent a body that is not JSON", code=f"{self.name}_error"
            ) from exc
        if not isinstance(body, dict):
            telemetry.UPSTREAM.labels(self.name, "bad_response").inc()
            raise UpstreamError(
                f"the {self.name} sent an unexpected body", code=f"{self.name}_error"
            )
        telemetry.UPSTREAM.labels(self.name, "ok").inc()
        return body

    async def stream_lines(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> AsyncGenerator[str, None]:
        """Send one JSON request and yield the lines of a 2xx streamed body as they arrive.

        Errors before the body are those of :meth:`request`; a transport failure mid-body is
        :meth:`transport_error`'s. Closing the iterator closes the response, so the server
        sees the client leave (llama.cpp and vLLM then stop decoding that request).
        """
        resp = await self._send(method, path, payload, stream=True)
        try:
            if resp.status_code >= 400:
                try:
                    await resp.aread()
                except httpx.HTTPError as exc:
                    raise self.transport_error(exc) from exc
                self._check_status(resp)
            try:
                async for line in resp.aiter_lines():
                    yield line
            except httpx.HTTPError as exc:
                raise self.transport_error(exc) from exc
            telemetry.UPSTREAM.labels(self.name, "ok").inc()
        finally:
            await resp.aclose()

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# Worker error codes that blame the input text (textcheck, the batcher's isolation).
_CLIENT_ERRORS = frozenset({400, 404, 409, 413, 422})
# a worker's 503s that describe the request's target, not the worker's health
_PASSED_503 = frozenset({"index_read_only", "index_writer_busy", "documents_unavailable"})


class ProxiedClientError(GainRAGError):
    """A 4xx of an upstream gainrag worker, passed on as it is."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message, code=code)
        self.status_code = status
        if status == 404:
            self.type = "not_found_error"
        elif status == 503:
            self.type = "unavailable_error"


INPUT_ERROR_CODES = frozenset(
    {"invalid_query", "invalid_document", "invalid_text", "unprocessable_input"}
)


def _error_code(resp: httpx.Response) -> str | None:
    """The ``error.code`` of a body in our error shape, else None."""
    try:
        body = resp.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def _error_message(resp: httpx.Response) -> str:
    """The upstream's own error message (our shape, OpenAI's, or FastAPI's), shortened."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(body.get("detail"), str):
            return str(body["detail"])[:300]
    return str(body)[:200]


def malformed(name: str, what: str) -> UpstreamError:
    """The error for a 2xx body that does not have the promised shape."""
    telemetry.UPSTREAM.labels(name, "bad_response").inc()
    return UpstreamError(f"the {name} sent a malformed response ({what})", code=f"{name}_error")


def off_model(name: str, exc: ValidationError) -> UpstreamError:
    """:func:`malformed` for a body its wire model refused: the first problem, briefly."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return malformed(name, f"{where}: {first['msg']}")


class WorkerClient:
    """A client of one gainrag worker: the pooled upstream plus the model name and version the
    worker reports on ``/ready`` (and in its responses, so a hot swap reaches cache keys)."""

    def __init__(
        self,
        upstream: str,
        base_url: str,
        *,
        timeout_s: float,
        connect_retries: int,
        name_key: str,
        version_key: str,
        token: str | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else None
        self.upstream = Upstream(
            upstream,
            make_client(base_url, timeout_s=timeout_s, headers=headers),
            connect_retries=connect_retries,
        )
        self._keys = (name_key, version_key)
        self.name = f"remote-{upstream}"
        self.version = "unknown"  # until the worker says (cache keys wait for it)

    async def refresh(self) -> None:
        """Read the worker's model name and version from its ``/ready``."""
        body = await self.upstream.request("GET", "/ready")
        models = body.get("models")
        if isinstance(models, dict):
            name_key, version_key = self._keys
            self.name = str(models.get(name_key, self.name))
            self.version = str(models.get(version_key, self.version))

    async def close(self) -> None:
        """Close the connection pool."""
        await self.upstream.close()
