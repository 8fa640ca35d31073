"""The playground: a static page at ``GET /`` that asks ``POST /answer`` (streamed) and shows the
candidates, the selected passage, the pseudo-passage, stage timings and degradations.

Three files from ``static/`` (package data, no build step, nothing from a CDN): the page, its
script and its stylesheet. The page carries a strict Content-Security-Policy (only same-origin
scripts, styles and fetches; no inline script, no framing), so an injected passage text cannot run
code even if the script mishandled it. The page itself holds nothing secret and is public; the API
calls it makes carry the key the user types (``Authorization: Bearer``) when keys are on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from gainrag.config import Settings

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    # Revalidate every time: a new release's page must not run with an old cached script.
    "cache-control": "no-cache",
}
_ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}


def _read(name: str) -> str:
    return (files("gainrag.api") / "static" / name).read_text(encoding="utf-8")


def page(settings: Settings) -> str:
    """The HTML with this server's settings filled in (whether a key is needed, top_n bounds)."""
    values = {
        "auth": "key" if settings.api.keys_file is not None else "none",
        "max_question_chars": str(settings.api.max_question_chars),
        "top_n": str(settings.pipeline.top_n),
        "max_top_n": str(settings.pipeline.max_top_n),
    }
    html = _read("index.html")
    for name, value in values.items():
        html = html.replace("{{" + name + "}}", value)
    return html


def install_playground(app: FastAPI, settings: Settings) -> None:
    """``GET /`` and its two assets under ``/static/`` (not in the OpenAPI schema); nothing when
    ``api.playground`` is off. The files are read once, here."""
    if not settings.api.playground:
        return
    html = page(settings).encode()
    assets = {name: (_read(name).encode(), media) for name, media in _ASSETS.items()}

    async def index() -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    for name, (body, media) in assets.items():
        app.add_api_route(
            f"/static/{name}", _serve(body, media), methods=["GET"], include_in_schema=False
        )


def _serve(body: bytes, media: str) -> Callable[[], Awaitable[Response]]:
    """A handler with no parameters (FastAPI would read defaults as query parameters)."""

    async def asset() -> Response:
        return Response(body, media_type=media, headers=_HEADERS)

    return asset
