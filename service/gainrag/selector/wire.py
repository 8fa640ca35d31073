"""The selector worker's wire models: ``POST /rerank`` in the vLLM/Jina shape.

The worker (:mod:`gainrag.api.workers.selector`) validates its requests with them and
:class:`~gainrag.selector.remote.RemoteSelector` builds its requests and validates the responses
with them (through :class:`RerankScores`, the part of a response it reads).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from gainrag.wire import PositiveJsonInt, Text


class RerankRequest(BaseModel):
    """Body of ``POST /rerank`` (the fields vLLM's and Jina's rerank APIs share)."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    documents: list[StrictStr] = Field(..., min_length=1)
    top_n: PositiveJsonInt | None = Field(None, description="Return only the best n results.")
    return_documents: StrictBool = False
    model: Text | None = Field(None, description="Accepted for compatibility; one model.")


class RerankDocument(BaseModel):
    """The document text, when ``return_documents`` is set."""

    text: str


class RerankResult(BaseModel):
    """One document's score; ``index`` points into the request's ``documents``."""

    index: int
    relevance_score: float = Field(..., description="The cross-encoder's raw logit.")
    document: RerankDocument | None = None


class Usage(BaseModel):
    """Tokens scored (query + document, after truncation)."""

    total_tokens: int


class RerankResponse(BaseModel):
    """Results sorted best first."""

    id: str
    model: str
    model_version: str
    results: list[RerankResult]
    usage: Usage


class RerankScores(BaseModel):
    """What a client reads of a :class:`RerankResponse`: the scores, and the model version.

    The version is optional (and the other fields ignored) as they always were for the client:
    a rerank server of the same shape need not report one.
    """

    results: list[RerankResult]
    model_version: str | None = None
