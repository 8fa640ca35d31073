"""Documents into ~100-word passages, like the corpus's (DPR-style) passages.

The splitting itself is ``semantic-text-splitter`` (the Rust ``text-splitter`` crate): it breaks
at the largest semantic unit that fits (sections and headings for Markdown, then paragraphs,
sentences, words), which a hand-written splitter would have to re-implement. Size is counted in
words by a callback, because the corpus's passages are 100 words, not a token budget.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from semantic_text_splitter import MarkdownSplitter, TextSplitter

Format = Literal["text", "markdown"]


def _words(text: str) -> int:
    return len(text.split())


@lru_cache(maxsize=8)
def _splitter(fmt: Format, words: int) -> MarkdownSplitter | TextSplitter:
    # a chunk is "full" anywhere in [0.8, 1.2] x words: whole sentences rather than exact counts
    capacity = (max(1, int(words * 0.8)), max(2, int(words * 1.2)))
    if fmt == "markdown":
        return MarkdownSplitter.from_callback(_words, capacity)
    return TextSplitter.from_callback(_words, capacity)


def split(text: str, fmt: Format = "text", *, words: int = 100) -> list[str]:
    """Passages of ``text``, in order, each at most ~1.2 x ``words`` words (a longer unbroken
    "word" stays whole). A piece much shorter than the target (a lone Markdown heading before a
    long section) is joined to the next one, so that no passage is a heading without its text."""
    chunks = [c for c in _splitter(fmt, words).chunks(text) if c.strip()]
    out: list[str] = []
    carry = ""
    for chunk in chunks:
        if carry:
            chunk = f"{carry}\n\n{chunk}"
            carry = ""
        if _words(chunk) < words // 4:
            carry = chunk
            continue
        out.append(chunk)
    if carry:  # a short tail joins the passage before it, if there is one
        if out:
            out[-1] = f"{out[-1]}\n\n{carry}"
        else:
            out.append(carry)
    return out
