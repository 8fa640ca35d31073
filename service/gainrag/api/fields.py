"""Field types of the workers' request bodies, and the limits their OpenAPI schema states.

The schema is a contract: a request it allows must not be refused for a reason it could have
said, and nothing it allows may crash a worker. These types close the gaps schemathesis found:
integral floats, Unicode whitespace, lone surrogates and the limits the handlers check.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from annotated_types import Ge
from fastapi import FastAPI
from pydantic import AfterValidator, BeforeValidator, StrictInt, StrictStr


def _integral_float_to_int(value: object) -> object:
    # JSON has one number type: to JSON Schema (and to clients that write every number as a
    # float) 80.0 is the integer 80. Strings and booleans are still refused by StrictInt.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[StrictInt, BeforeValidator(_integral_float_to_int)]
"""An integer field: ``80`` or ``80.0``; never ``"80"``, ``true`` or ``80.5``."""
# The bound before the validator: pydantic then writes it as JSON Schema's ``minimum`` also
# inside ``anyOf`` (``JsonInt | None`` with ``Field(ge=1)`` emits a non-standard ``ge``).
PositiveJsonInt = Annotated[StrictInt, Ge(1), BeforeValidator(_integral_float_to_int)]
"""A :data:`JsonInt` of at least 1."""


def _well_formed(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone UTF-16 surrogate, which neither the tokenizers
    # nor a JSON response can encode as UTF-8: refuse it as bad input (422), not with a 500.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text has an unpaired UTF-16 surrogate at position {exc.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_well_formed)]
"""A string that is valid Unicode (no lone surrogates)."""

# What str.isspace() (and so str.strip()) calls whitespace, spelled out: ``\s`` means something
# else in Python (U+001C-U+001F included), in ECMAScript (U+FEFF included) and in Rust, and the
# same pattern must mean the same to the schema's readers and to the handler's check.
_SPACES = (
    (0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)  # fmt: skip
NON_BLANK = (
    "[^" + "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in _SPACES) + "]"
)
"""Regex (JSON Schema ``pattern``, unanchored): at least one character that is not whitespace."""
NON_BLANK_RE = re.compile(NON_BLANK)


def query_schema(limit: int) -> dict[str, Any]:
    """JSON-schema keywords of a query string: what ``require_query`` enforces."""
    return {"minLength": 1, "maxLength": limit, "pattern": NON_BLANK}


def declare_limits(app: FastAPI, limits: dict[str, dict[str, Any]]) -> None:
    """State in the app's OpenAPI schema the limits its handlers enforce themselves.

    The handlers check configured limits (query length, documents per request) with error codes
    of their own (``too_many_documents``...); declaring them too lets a client, or a schema-driven
    fuzzer, know what is accepted before it is refused. ``limits`` maps ``"Model.field"`` (or
    ``"Model.field[]"``, the items of a list) to JSON-schema keywords.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI caches it in app.openapi_schema: patched once
        models = schema["components"]["schemas"]
        for where, keywords in limits.items():
            model, _, name = where.partition(".")
            node = models[model]["properties"][name.removesuffix("[]")]
            (node["items"] if name.endswith("[]") else node).update(keywords)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
