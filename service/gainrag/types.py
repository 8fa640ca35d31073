"""Plain data types shared by the pipeline, its components and the API."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    """A corpus passage (or the pseudo-passage, with ``pseudo=True`` and an empty title)."""

    id: str
    title: str
    text: str
    pseudo: bool = False

    def as_candidate_text(self) -> str:
        """The selector's view of a candidate: ``title\\ntext`` (empty title for the pseudo)."""
        return f"{self.title}\n{self.text}"


@dataclass(frozen=True)
class Retrieved:
    """A passage with its retrieval rank (0-based) and score (cosine similarity)."""

    passage: Passage
    rank: int
    score: float


@dataclass
class Scored:
    """A candidate after selection."""

    passage: Passage
    score: float
    retrieval_rank: int | None = None
    retrieval_score: float | None = None


@dataclass
class AnswerResult:
    """Everything one pass through the pipeline produced."""

    answer: str
    selected: list[Scored]
    candidates: list[Scored]
    retrieved: list[Retrieved]
    pseudo_passage: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
