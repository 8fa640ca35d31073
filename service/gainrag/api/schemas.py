"""Wire schemas of the public API (kept apart from internal types so either can evolve):
``/answer``'s, then the OpenAI-compatible routes' (``/v1``); the documents API's are the
retrieval worker's (re-exported below)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    WithJsonSchema,
)

# /v1/documents: the retrieval worker serves the same routes, so its models are shared with it
# (defined in gainrag.retrieval.wire, re-exported here for the gateway's routes).
from gainrag.retrieval.wire import AddDocumentsRequest as AddDocumentsRequest
from gainrag.retrieval.wire import AddDocumentsResponse as AddDocumentsResponse
from gainrag.retrieval.wire import DeleteDocumentResponse as DeleteDocumentResponse
from gainrag.retrieval.wire import DocumentOut as DocumentOut
from gainrag.retrieval.wire import DocumentPage as DocumentPage
from gainrag.textcheck import invalid_character, is_blank
from gainrag.wire import TEXT_OR_EMPTY_PATTERN, TEXT_PATTERN, JsonInt


class AnswerRequest(BaseModel):
    """Body of ``POST /answer``."""

    model_config = ConfigDict(extra="forbid")

    question: StrictStr = Field(
        ...,
        description="The question: 1 to GAINRAG_API__MAX_QUESTION_CHARS characters and at most "
        "GAINRAG_API__MAX_QUESTION_TOKENS generator tokens, not blank or invisible-only, no lone "
        "surrogates or control characters other than tab, newline and carriage return.",
    )
    top_n: JsonInt | None = Field(
        None,
        description="Passages given to the generator, 1 to GAINRAG_PIPELINE__MAX_TOP_N "
        "(default GAINRAG_PIPELINE__TOP_N).",
    )
    return_candidates: StrictBool = Field(False, description="Also return every scored candidate.")
    stream: StrictBool = Field(
        False,
        description="Stream Server-Sent Events (passages, token, done, error; see docs/api.md) "
        "instead of one JSON body; so does 'Accept: text/event-stream'.",
    )


class PassageOut(BaseModel):
    """A passage shown to the generator, or a scored candidate."""

    id: str = Field(..., description="Passage id: '<document id>#<n>' for posted documents.")
    document_id: str | None = Field(
        None,
        description="The document it belongs to (GET /v1/documents/{id}); null for the "
        "pseudo-passage.",
    )
    title: str
    text: str
    score: float = Field(
        ...,
        description="Ranking score: the selector's score, min-max mixed with the retrieval score "
        "when pipeline.retrieval_weight > 0 (the default); the retrieval score if no selection.",
    )
    pseudo: bool = Field(..., description="True for the LLM-written pseudo-passage.")
    retrieval_rank: int | None = Field(None, description="0-based rank from the retriever.")
    retrieval_score: float | None = None
    selector_score: float | None = Field(
        None, description="The selector's own score (null without selection or selector down)."
    )


class Timings(BaseModel):
    """Per-stage wall time in milliseconds; a skipped stage is 0."""

    retrieve: float
    pseudo: float
    select: float = Field(
        ...,
        description="Selection time on the critical path: from when both retrieval and the "
        "pseudo-passage were in until the ranking was ready.",
    )
    select_retrieved: float = Field(
        0.0,
        description="Pipelined selection: scoring the retrieved passages, started as soon as "
        "retrieval returned (0 when selection is not pipelined).",
    )
    select_pseudo: float = Field(
        0.0,
        description="Pipelined selection: scoring the pseudo-passage alone when it arrived "
        "(0 when selection is not pipelined or the pseudo-passage was dropped).",
    )
    generate: float
    total: float


class DegradationOut(BaseModel):
    """A dependency that failed, and how the answer was made without it."""

    kind: str = Field(..., description="'retrieval_down' or 'selector_down'.")
    message: str


class AnswerResponse(BaseModel):
    """Body of a successful ``POST /answer``."""

    request_id: str
    answer: str
    passages: list[PassageOut]
    candidates: list[PassageOut] | None = None
    pseudo_passage: str | None = Field(
        None, description="What the LLM wrote as background (also when it was not selected)."
    )
    timings_ms: Timings
    models: dict[str, str]
    cached: bool = Field(False, description="True when the answer came from the cache.")
    degraded: list[DegradationOut] = Field(
        default_factory=list,
        description="Empty normally; lists each fallback used (see the README's failure policy).",
    )


# --- OpenAI-compatible (``/v1``) --------------------------------------------------------------

MODEL_ID = "gainrag"
"""The one model name the OpenAI-compatible routes serve and answer with."""


class TextPart(BaseModel):
    """A text part of a message's content array."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; only ``user`` messages are read."""

    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions``. Sampling parameters (``temperature``,
    ``max_tokens``, ...) are accepted and ignored: decoding is greedy with the service's budget."""

    model_config = ConfigDict(extra="ignore")

    # Any name is accepted (chat front ends send their own defaults); responses say 'gainrag'.
    model: StrictStr = Field(
        ...,
        description=f"'{MODEL_ID}' (see GET /v1/models); any name is "
        "accepted and answered by the one pipeline.",
    )
    messages: list[ChatMessage] = Field(..., description="The last user message is the question.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_n: JsonInt | None = Field(None, description="Extension: passages given to the generator.")


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "gainrag"


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- feedback (``/v1/feedback``) ----------------------------------------------------------------

MAX_CORRECT_ANSWER_CHARS = 1000
MAX_COMMENT_CHARS = 2000


def _feedback_text(text: str, limit: int, *, blank_ok: bool) -> str:
    """A text field of a feedback: valid Unicode, at most ``limit`` characters, not blank unless
    ``blank_ok``; kept in NFC, stripped."""
    bad = invalid_character(text)
    if bad is not None:
        raise ValueError(f"text contains {bad[1]} at character {bad[0]}")
    if len(text) > limit:
        raise ValueError(f"text is longer than {limit} characters")
    if not blank_ok and is_blank(text):
        raise ValueError("text must contain something visible")
    return unicodedata.normalize("NFC", text).strip()


def _correct_answer(text: str) -> str:
    return _feedback_text(text, MAX_CORRECT_ANSWER_CHARS, blank_ok=False)


def _comment(text: str) -> str:
    return _feedback_text(text, MAX_COMMENT_CHARS, blank_ok=True)


# The schema states what the validators check (invisible-only text aside, as for questions).
CorrectAnswer = Annotated[
    StrictStr,
    AfterValidator(_correct_answer),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_CORRECT_ANSWER_CHARS,
            "pattern": TEXT_PATTERN,
        }
    ),
]
Comment = Annotated[
    StrictStr,
    AfterValidator(_comment),
    WithJsonSchema(
        {"type": "string", "maxLength": MAX_COMMENT_CHARS, "pattern": TEXT_OR_EMPTY_PATTERN}
    ),
]


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(
        ...,
        pattern=r"^(chatcmpl-)?[A-Za-z0-9._-]{1,128}$",
        description="The answer's request id: /answer's request_id (also its X-Request-ID "
        "header), or a chat completion's id ('chatcmpl-<request id>') or X-Request-ID.",
    )
    rating: Literal["up", "down"] = Field(
        ..., description="'up': the answer was right; 'down': it was wrong."
    )
    correct_answer: CorrectAnswer | None = Field(
        None,
        description=f"The right answer (1 to {MAX_CORRECT_ANSWER_CHARS} characters): what a "
        "training question made from this feedback answers.",
    )
    comment: Comment | None = Field(
        None, description=f"Free text, at most {MAX_COMMENT_CHARS} characters (kept, not used)."
    )


class FeedbackResponse(BaseModel):
    """Body of a successful ``POST /v1/feedback``."""

    request_id: str = Field(
        ..., description="The answer's request id (a chat completion's without 'chatcmpl-')."
    )
    rating: Literal["up", "down"]
    replaced: bool = Field(
        ..., description="True when this replaced feedback the same key gave on it before."
    )
