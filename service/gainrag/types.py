"""Plain data types shared by the pipeline, its components and the API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PSEUDO_ID = "pseudo"  # the id of the LLM-written pseudo-passage among the candidates


# slots: the answer path builds ~100 of these per request; slotted instances are cheaper.
@dataclass(frozen=True, slots=True)
class Passage:
    """A corpus passage (or the pseudo-passage, with ``pseudo=True`` and an empty title)."""

    id: str
    title: str
    text: str
    pseudo: bool = False

    def as_candidate_text(self) -> str:
        """The selector's view of a candidate: ``title\\ntext`` (empty title for the pseudo)."""
        return f"{self.title}\n{self.text}"


def document_id(passage_id: str) -> str:
    """The document a passage came from: ``doc#3`` -> ``doc`` (the documents API's passages);
    a corpus passage is a document of its own (no ``#``)."""
    return passage_id.rsplit("#", 1)[0]


@dataclass(frozen=True, slots=True)
class Retrieved:
    """A passage with its retrieval rank (0-based) and score (cosine similarity)."""

    passage: Passage
    rank: int
    score: float


@dataclass(slots=True)
class Scored:
    """A candidate after selection."""

    passage: Passage
    score: float
    retrieval_rank: int | None = None
    retrieval_score: float | None = None
    # the selector's own score; ``score`` mixes it with the retrieval score when
    # pipeline.retrieval_weight > 0 (None without selection or with the selector down)
    selector_score: float | None = None


@dataclass(frozen=True)
class Degradation:
    """A dependency failed and the pipeline answered anyway (see the fallback policy)."""

    kind: str  # retrieval_down | selector_down
    message: str


@dataclass
class AnswerResult:
    """Everything one pass through the pipeline produced."""

    answer: str
    selected: list[Scored]
    candidates: list[Scored]
    retrieved: list[Retrieved]
    pseudo_passage: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[Degradation] = field(default_factory=list)
    cached: bool = False

    def to_cache(self) -> dict[str, Any]:
        """JSON-able form for the answer cache (timings and flags are per request, not kept)."""
        return {
            "answer": self.answer,
            "selected": [asdict(s) for s in self.selected],
            "candidates": [asdict(s) for s in self.candidates],
            "retrieved": [asdict(r) for r in self.retrieved],
            "pseudo_passage": self.pseudo_passage,
        }

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> AnswerResult:
        """Inverse of :meth:`to_cache`; raises KeyError/TypeError on a foreign shape."""

        def scored(d: dict[str, Any]) -> Scored:
            return Scored(
                Passage(**d["passage"]),
                d["score"],
                d["retrieval_rank"],
                d["retrieval_score"],
                d.get("selector_score"),  # absent from answers cached before the field existed
            )

        return cls(
            answer=data["answer"],
            selected=[scored(d) for d in data["selected"]],
            candidates=[scored(d) for d in data["candidates"]],
            retrieved=[
                Retrieved(Passage(**d["passage"]), d["rank"], d["score"]) for d in data["retrieved"]
            ],
            pseudo_passage=data["pseudo_passage"],
            cached=True,
        )
