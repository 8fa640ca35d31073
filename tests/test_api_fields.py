"""The workers' field types: what their schema says is what they accept."""

from __future__ import annotations

import re
import sys

import pytest
from pydantic import BaseModel, ValidationError

from gainrag.textcheck import invalid_character
from gainrag.wire import NON_BLANK, TEXT_PATTERN, JsonInt, PositiveJsonInt, Text

NON_BLANK_RE = re.compile(NON_BLANK)


class _Body(BaseModel):
    n: JsonInt = 1
    top: PositiveJsonInt | None = None
    text: Text = "x"


def test_non_blank_is_exactly_not_isspace_and_not_a_refused_control() -> None:
    # Every code point: the class excludes str.isspace() and textcheck's refused controls only.
    def expected(c: str) -> bool:
        return (not c.isspace() and invalid_character(c) is None) or 0xD800 <= ord(c) <= 0xDFFF

    assert all(
        bool(NON_BLANK_RE.fullmatch(chr(i))) == expected(chr(i)) for i in range(sys.maxunicode + 1)
    )
    assert re.fullmatch(r"\[\^(\\u[0-9a-f]{4}(-\\u[0-9a-f]{4})?)+\]", NON_BLANK)  # portable


@pytest.mark.parametrize(
    ("text", "ok"),
    [("q", True), ("who wrote\thamlet?\n", True), ("  ", False), ("\x1d", False), ("a\x00", False)],
)
def test_text_pattern_matches_what_the_handlers_accept(text: str, ok: bool) -> None:
    assert bool(re.fullmatch(TEXT_PATTERN, text)) is ok


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
    with pytest.raises(ValidationError, match=r"lone surrogate U\+D800.* at character 1"):
        # What FastAPI's json.loads makes of "a\ud800" (pydantic's own JSON parser refuses it).
        _Body.model_validate({"text": "a\ud800"})
