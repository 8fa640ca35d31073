"""The selector worker's wire models: ``POST /rerank`` in the vLLM/Jina shape.

The worker (:mod:`gainrag.api.workers.selector`) validates its requests with them and
:class:`~gainrag.selector.remote.RemoteSelector` builds its requests and validates the responses
with them (through :class:`RerankScores`, the part of a response it reads).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from gainrag.wire import TEXT_OR_EMPTY_PATTERN, JsonInt, PositiveJsonInt, Text


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


# --- Cohere-compatible rerank (POST /v1/rerank and /v2/rerank) ----------------------------------
# The request and response shapes of Cohere's rerank API (v1 and v2), which its official SDKs
# (``cohere.Client.rerank``, ``cohere.ClientV2.rerank``) and vLLM's routes of the same names speak.


class CohereDocument(BaseModel):
    """A document object (v1): its ``text`` is scored; its other string fields are returned
    with it when ``return_documents`` is set."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"propertyNames": {"pattern": TEXT_OR_EMPTY_PATTERN}}
    )
    __pydantic_extra__: dict[str, Text]  # the other fields: strings, as Cohere's are

    text: StrictStr


class CohereRerankRequest(BaseModel):
    """Body of ``POST /v1/rerank`` and ``/v2/rerank``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    documents: list[StrictStr | CohereDocument] = Field(
        ...,
        min_length=1,
        description="Texts, or objects with a 'text' field (v1; their other fields are returned "
        "with the document).",
    )
    model: Text | None = Field(
        None, description="Required by the v2 SDK; accepted whatever it names (one model)."
    )
    top_n: PositiveJsonInt | None = Field(None, description="Return only the best n results.")
    return_documents: StrictBool = Field(
        False, description="Return each result's document (v1; v2 never returns documents)."
    )
    max_tokens_per_doc: PositiveJsonInt | None = Field(
        None,
        description="Truncate each document to this many model tokens before scoring (the pair "
        "is also truncated to the model's max length).",
    )
    priority: JsonInt | None = Field(None, description="Accepted for compatibility; one queue.")


class CohereApiVersion(BaseModel):
    """Which API shape answered."""

    version: str


class CohereBilledUnits(BaseModel):
    """Cohere's billing unit: one search unit per query with up to 100 documents."""

    search_units: int


class CohereTokens(BaseModel):
    """Tokens scored (query + document pairs, after truncation)."""

    input_tokens: int


class CohereMeta(BaseModel):
    """Cohere's ``meta`` object."""

    api_version: CohereApiVersion
    billed_units: CohereBilledUnits
    tokens: CohereTokens


class CohereRerankResult(BaseModel):
    """One document; ``index`` points into the request's ``documents``."""

    index: int
    relevance_score: float = Field(
        ..., description="sigmoid of the cross-encoder's logit, in [0, 1] as Cohere's are."
    )
    document: dict[str, str] | None = None


class CohereRerankResponse(BaseModel):
    """Results sorted best first."""

    id: str
    results: list[CohereRerankResult]
    meta: CohereMeta
