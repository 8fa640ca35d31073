"""Bearer API keys for the public routes, as FastAPI dependencies.

Use :data:`ApiPrincipal` on every public route (``principal: ApiPrincipal``); it resolves the
caller from ``Authorization: Bearer <key>`` against the keys file (``GAINRAG_API__KEYS_FILE``):
401 without or with an unknown key, 403 for a revoked one. Without a keys file the API is open
and every caller is :data:`ANONYMOUS` (no per-key limits, may refresh the cache).

Workers use one shared token instead (:data:`WorkerToken`, ``GAINRAG_WORKER__API_TOKEN``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gainrag.config import ApiSettings, Settings
from gainrag.errors import AuthenticationError, ConfigurationError, ForbiddenError
from gainrag.keys import KeyStore


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do."""

    name: str
    can_refresh: bool = False
    can_write: bool = False  # the documents API's write routes
    rate: float | None = None  # requests/s; None = unlimited
    burst: int = 1
    max_in_flight: int | None = None  # this caller's share of the in-flight limit; None = all


# Open mode (no keys file) is a local or trusted deployment: everyone may refresh and write.
ANONYMOUS = Principal("anonymous", can_refresh=True, can_write=True)

# auto_error=False: the 401 is ours (error shape, WWW-Authenticate), and open mode needs no header.
_bearer = HTTPBearer(auto_error=False, description="An API key from `gainrag keys add`.")


class Authenticator:
    """Maps a presented key to a :class:`Principal` (``keys is None``: open mode)."""

    def __init__(self, api: ApiSettings) -> None:
        self.api = api
        self.keys = KeyStore(api.keys_file) if api.keys_file is not None else None
        for what, access in (("metrics", api.metrics_access), ("docs", api.docs_access)):
            if access == "key" and self.keys is None:
                raise ConfigurationError(
                    f"GAINRAG_API__{what.upper()}_ACCESS=key needs GAINRAG_API__KEYS_FILE"
                )

    @property
    def enabled(self) -> bool:
        """Whether keys are required."""
        return self.keys is not None

    def authenticate(self, key: str | None) -> Principal:
        """The caller of ``key``, or 401/403."""
        if self.keys is None:
            return ANONYMOUS
        if not key:
            raise AuthenticationError(
                "an API key is required: send 'Authorization: Bearer <key>'", code="missing_key"
            )
        rec = self.keys.lookup(key)
        if rec is None:
            raise AuthenticationError("the API key is not valid", code="invalid_key")
        if rec.revoked:
            raise ForbiddenError(f"the API key '{rec.name}' is revoked", code="key_revoked")
        api = self.api
        share = rec.max_in_flight or max(1, math.floor(api.key_share * api.max_in_flight))
        return Principal(
            rec.name,
            can_refresh=rec.can_refresh,
            can_write=rec.can_write,
            rate=rec.rate or api.key_rate,
            burst=rec.burst or api.key_burst,
            max_in_flight=min(share, api.max_in_flight),
        )


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Dependency: the authenticated caller (see the module doc)."""
    auth: Authenticator = request.app.state.auth
    who = auth.authenticate(credentials.credentials if credentials else None)
    request.state.principal = who.name  # the access log names the key, never shows it
    return who


ApiPrincipal = Annotated[Principal, Depends(principal)]


async def require_key(request: Request, who: ApiPrincipal) -> None:
    """Dependency of endpoints set to ``key`` access (``/metrics``, ``/docs``)."""


async def worker_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Dependency: the worker's ``GAINRAG_WORKER__API_TOKEN``, if one is set (401 otherwise)."""
    settings: Settings = request.app.state.worker.settings
    token = settings.worker.api_token
    if token is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, token.get_secret_value().encode()):
        raise AuthenticationError("missing or wrong worker token", code="bad_token")


WorkerToken = Depends(worker_token)
