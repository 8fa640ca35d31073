"""The workers' field types: what their schema says is what they accept."""

from __future__ import annotations

import re
import sys

import pytest
from pydantic import BaseModel, ValidationError

from gainrag.api.fields import NON_BLANK, NON_BLANK_RE, JsonInt, PositiveJsonInt, Text


class _Body(BaseModel):
    n: JsonInt = 1
    top: PositiveJsonInt | None = None
    text: Text = "x"


def test_non_blank_is_exactly_not_isspace() -> None:
    # Every code point: the pattern's whitespace class is str.isspace(), nothing more or less.
    blank = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    assert not any(NON_BLANK_RE.search(c) for c in blank)
    assert sum(1 for i in range(sys.maxunicode + 1) if NON_BLANK_RE.search(chr(i))) == (
        sys.maxunicode + 1 - len(blank)
    )
    assert re.fullmatch(r"\[\^(\\u[0-9a-f]{4}(-\\u[0-9a-f]{4})?)+\]", NON_BLANK)  # portable


@pytest.mark.parametrize("raw", ['{"n": 80.0}', '{"n": 80}'])
def test_integral_floats_are_integers(raw: str) -> None:
    assert _Body.model_validate_json(raw).n == 80


@pytest.mark.parametrize(
    "raw", ['{"n": "80"}', '{"n": true}', '{"n": 80.5}', '{"top": 0}', '{"top": 0.0}']
)
def test_non_integers_are_refused(raw: str) -> None:
    with pytest.raises(ValidationError):
        _Body.model_validate_json(raw)


def test_positive_bound_is_standard_json_schema() -> None:
    top = _Body.model_json_schema()["properties"]["top"]
    assert {"type": "integer", "minimum": 1} in top["anyOf"]


def test_lone_surrogates_are_refused() -> None:
    assert _Body.model_validate_json('{"text": "\\ud83d\\ude00"}').text == "\U0001f600"
    with pytest.raises(ValidationError, match="unpaired UTF-16 surrogate at position 1"):
        # What FastAPI's json.loads makes of "a\ud800" (pydantic's own JSON parser refuses it).
        _Body.model_validate({"text": "a\ud800"})
