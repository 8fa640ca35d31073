"""The wire vocabulary every gainrag HTTP process shares: field types of request bodies, the
text patterns their schema states, and the error shape.

Plain pydantic, no FastAPI: the workers' wire models (``retrieval/wire.py``, ``selector/wire.py``)
are used by their remote clients too. The schema is a contract: a request it allows must not be
refused for a reason it could have said, and nothing it allows may crash a worker. These types
close the gaps schemathesis found: integral floats, Unicode whitespace, lone surrogates and the
limits the handlers check (stated in the schema by :func:`gainrag.api.openapi.declare_limits`).
"""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Ge
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from gainrag.textcheck import invalid_character


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


# What str.isspace() (and so str.strip()) calls whitespace, spelled out: ``\s`` means something
# else in Python (U+001C-U+001F included), in ECMAScript (U+FEFF included) and in Rust, and the
# same pattern must mean the same to the schema's readers and to the handler's check.
_SPACES = (
    (0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)  # fmt: skip


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in ranges)


# The control characters textcheck refuses (category Cc but tab, LF, CR).
_CONTROLS = ((0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x7F, 0x9F))
_ALLOWED = "[^" + _ranges(_CONTROLS) + "]"
NON_BLANK = "[^" + _ranges(_SPACES) + _ranges(_CONTROLS) + "]"
"""Regex: one character that is neither whitespace nor a refused control character."""
TEXT_PATTERN = f"^{_ALLOWED}*{NON_BLANK}{_ALLOWED}*$"
"""JSON Schema ``pattern`` of a query: no refused control character, at least one that is not
whitespace. Invisible-only text (zero-width characters) is refused too, which a portable pattern
cannot say; textcheck.is_blank documents it."""


TEXT_OR_EMPTY_PATTERN = f"^{_ALLOWED}*$"
"""JSON Schema ``pattern`` of a document: any text without a refused control character."""


def _well_formed(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone UTF-16 surrogate, which neither the tokenizers
    # nor a JSON response can encode as UTF-8; control characters are refused too (textcheck).
    bad = invalid_character(text)
    if bad is not None:
        raise ValueError(f"text contains {bad[1]} at character {bad[0]}")
    return text


# The pattern in the schema says what the validator checks, so a schema-driven client or fuzzer
# knows which strings are refused.
Text = Annotated[
    StrictStr,
    AfterValidator(_well_formed),
    WithJsonSchema({"type": "string", "pattern": TEXT_OR_EMPTY_PATTERN}),
]
"""A string of valid Unicode text: no lone surrogates, no control characters but tab/CR/LF."""


def query_schema(limit: int) -> dict[str, Any]:
    """JSON-schema keywords of a query or question: what ``require_query`` enforces."""
    return {"minLength": 1, "maxLength": limit, "pattern": TEXT_PATTERN}


class ErrorBody(BaseModel):
    """The error object."""

    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody
