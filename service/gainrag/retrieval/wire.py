"""The retrieval worker's wire models (``POST /retrieve``, ``POST /admin/reload-index``).

The worker (:mod:`gainrag.api.workers.retrieval`) validates its requests with them and
:class:`~gainrag.retrieval.remote.RemoteRetriever` builds its requests and validates the
responses with them, so the two cannot drift apart.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gainrag.wire import JsonInt, Text


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve``."""

    model_config = ConfigDict(extra="forbid")

    queries: list[StrictStr] = Field(..., min_length=1, description="Questions to search for.")
    k: JsonInt = Field(100, ge=1, le=1000, description="Passages per query.")


class Hit(BaseModel):
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float = Field(..., description="Cosine similarity of normalised vectors.")


class RetrieveResponse(BaseModel):
    """Per query, its top-k passages, best first."""

    results: list[list[Hit]]
    index_version: str
    encoder: str


class ReloadRequest(BaseModel):
    """Body of ``POST /admin/reload-index``."""

    model_config = ConfigDict(extra="forbid")

    index_dir: Text | None = Field(
        None, description="Index directory to load; default: the configured one (rebuilt in place)."
    )


class ReloadResponse(BaseModel):
    """What the swap did."""

    previous_version: str
    version: str
    count: int
    index_dir: str
