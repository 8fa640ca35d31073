"""Text validation and normalisation, before any text is queued for a model.

One module for the gateway's question and the workers' queries and documents, so every entry
point refuses the same inputs with the same message:

- a lone surrogate (``"\\ud800"`` is valid JSON but not Unicode text; tokenizers crash on it),
- a control character other than tab, newline and carriage return (NUL, ESC, DEL, C1 controls),
- text that is only whitespace or invisible characters (zero-width spaces, joiners, BOMs, ...).

Accepted text is put in Unicode NFC: canonical composition never changes what the text says (an
``e`` + combining acute and a precomposed ``é`` are the same letter), so the model, the cache key
and the logs see one spelling. NFKC/case folding would change meaning (``x²`` -> ``x2``) and are
not applied.
"""

from __future__ import annotations

import unicodedata

from gainrag.errors import ValidationFailedError

_ALLOWED_CONTROLS = frozenset("\t\n\r")
# Categories that draw nothing on their own: format characters (zero-width space/joiners, BOM,
# bidi marks), combining marks without a base, separators.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Mn", "Me", "Zs", "Zl", "Zp", "Cc"})
# Letters and symbols that render as blanks (Hangul fillers, braille blank) and are used to fake
# a non-empty string.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def invalid_character(text: str) -> tuple[int, str] | None:
    """``(index, description)`` of the first character no model should see, or None."""
    for i, ch in enumerate(text):
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF:
            return i, f"a lone surrogate U+{cp:04X} (not valid Unicode text)"
        if unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS:
            return i, f"the control character {_describe(ch)}"
    return None


def is_blank(text: str) -> bool:
    """True when nothing in ``text`` would be visible: whitespace and invisible characters only."""
    return all(
        ch.isspace() or ch in _BLANK_GLYPHS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES
        for ch in text
    )


def check_text(label: str, text: str, *, code: str = "invalid_text") -> str:
    """``text`` in NFC, or 422 ``code`` naming ``label`` and the offending character.

    Only the characters are checked here; emptiness and length limits are the caller's (their
    codes and messages differ between the gateway and the workers).
    """
    bad = invalid_character(text)
    if bad is not None:
        i, what = bad
        raise ValidationFailedError(
            f"{label} contains {what} at character {i}; send printable Unicode text "
            "(tab, newline and carriage return are the only control characters allowed)",
            code=code,
        )
    return unicodedata.normalize("NFC", text)
