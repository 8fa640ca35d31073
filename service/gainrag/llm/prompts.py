"""GainRAG's prompts, shared by the answer path and (later) gain-signal synthesis.

The version hash below goes into cache keys: editing any template changes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from gainrag.types import Passage

PSEUDO_INSTRUCTION = (
    "Please provide background for the question below in 100 words. Do not respond with anything "
    'other than background. If you do not know or are unsure, please generate "N/A" directly.'
)
PSEUDO_TEMPLATE = "{instruction}\n\nQuestion: {question}"
ANSWER_INSTRUCTION = "Answer the question below concisely in a few words."
ANSWER_TEMPLATE = "{passages}\n\n### Instruction:\n{instruction}\n\n### Input:\n{question}\n"
CLOSED_BOOK_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{question}\n"
PASSAGE_TEMPLATE = "Passage #{i}  title:{title}\nPassage #{i}  text:{text}"

PROMPT_VERSION = hashlib.sha256(
    "\x1f".join(
        [
            PSEUDO_INSTRUCTION,
            PSEUDO_TEMPLATE,
            ANSWER_INSTRUCTION,
            ANSWER_TEMPLATE,
            CLOSED_BOOK_TEMPLATE,
            PASSAGE_TEMPLATE,
        ]
    ).encode()
).hexdigest()[:12]

_NA = re.compile(r"^\W*n\s*/\s*a\b", re.IGNORECASE)
# The opening bracket of chat-template control strings of the common model families: ChatML,
# Llama 3 and Phi (<|...|>), DeepSeek (<｜...｜>), Llama 2/Mistral ([INST], <<SYS>>), Gemma
# (<start_of_turn>) and the usual <s>, </s>, <bos>, <eos>.
_CONTROL_TEXT = re.compile(
    r"<(?=[|｜][^<>\n]{0,64}[|｜]>)"
    r"|<(?=/?(?:s|bos|eos|pad|unk|start_of_turn|end_of_turn)>)"
    r"|<(?=</?SYS>>)"
    r"|\[(?=/?INST\])"
)


def neutralize_control_text(text: str) -> str:
    """``text`` with a space after the opening bracket of every chat-control string in it.

    For servers that apply the chat template themselves (the OpenAI backend) and then parse
    special tokens in the whole prompt: ``<|im_start|>`` typed by a user becomes ``< |im_start|>``,
    which no tokenizer maps to a control token. Our own templates contain none of these strings.
    """
    return _CONTROL_TEXT.sub(lambda m: m.group(0) + " ", text)


def pseudo_prompt(question: str) -> str:
    """User message that asks the LLM for a ~100-word background pseudo-passage."""
    return PSEUDO_TEMPLATE.format(instruction=PSEUDO_INSTRUCTION, question=question)


def is_not_available(text: str) -> bool:
    """True for an empty pseudo-passage or one that says "N/A" (GainRAG drops those)."""
    return not text.strip() or bool(_NA.match(text.strip()))


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words of ``text``."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def render_passages(passages: Sequence[Passage], max_words: int | None = None) -> str:
    """``Passage #i  title:...\\nPassage #i  text:...`` blocks, one per passage, 1-based."""
    return "\n".join(
        PASSAGE_TEMPLATE.format(
            i=i,
            title=p.title,
            text=truncate_words(p.text, max_words) if max_words else p.text,
        )
        for i, p in enumerate(passages, 1)
    )


def answer_prompt(question: str, passages: Sequence[Passage], max_words: int | None = None) -> str:
    """User message for the generator; with no passages it is the closed-book prompt."""
    if not passages:
        return CLOSED_BOOK_TEMPLATE.format(instruction=ANSWER_INSTRUCTION, question=question)
    return ANSWER_TEMPLATE.format(
        passages=render_passages(passages, max_words),
        instruction=ANSWER_INSTRUCTION,
        question=question,
    )


def clean_answer(text: str) -> str:
    """The first non-empty line of a generation, stripped (the answer is "a few words")."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class AnswerCleaner:
    """:func:`clean_answer` applied to a reply that arrives in pieces.

    ``feed`` returns the new text of the cleaned answer (whitespace that may yet turn out to be
    trailing is held back), and ``complete`` turns true once the first non-empty line has ended:
    nothing after it can change the answer, so the caller may stop generating. The pieces
    returned by ``feed`` and ``finish`` concatenate to exactly ``clean_answer(whole reply)``.
    """

    def __init__(self) -> None:
        self.raw = ""
        self.sent = ""
        self.complete = False

    def _visible(self) -> str:
        text = self.raw.lstrip()
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.strip():
                # splitlines drops a final line break: a sentinel tells whether this line ended.
                self.complete = i < len((text + "x").splitlines()) - 1
                return line.strip()
        return ""

    def _new(self, visible: str) -> str:
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent) :], visible
        return delta

    def feed(self, delta: str) -> str:
        """Take a raw delta; return the answer's new text (possibly empty)."""
        if self.complete:
            return ""
        self.raw += delta
        return self._new(self._visible())

    def finish(self) -> str:
        """The rest of the answer once the reply ended."""
        return self._new(clean_answer(self.raw))
