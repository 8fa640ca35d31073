"""Pipeline fan-out semantics: both stages overlap; a failure cancels the sibling; pipelined
selection scores the retrieved passages while the pseudo-passage is written, with equal scores."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gainrag.concurrency import gather_or_cancel
from gainrag.config import REPO_ROOT, Settings
from gainrag.errors import UpstreamError
from gainrag.llm import prompts
from gainrag.pipeline import Components, Pipeline
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import PassageIndex
from gainrag.selector.cosine import CosineSelector
from gainrag.selector.interface import Selector
from gainrag.types import PSEUDO_ID, Passage, Retrieved


async def test_both_results_in_order() -> None:
    async def slow(x: int, d: float) -> int:
        await asyncio.sleep(d)
        return x

    assert await gather_or_cancel(slow(0, 0.05), slow(2, 0.0)) == (0, 2)


async def test_both_run_concurrently() -> None:
    # Each waits for the other to have started: in sequence this would never finish.
    started = [asyncio.Event(), asyncio.Event()]

    async def rendezvous(me: int) -> int:
        started[me].set()
        await started[1 - me].wait()
        return me

    assert await asyncio.wait_for(gather_or_cancel(rendezvous(0), rendezvous(1)), 5) == (0, 1)


@pytest.mark.parametrize("failing_first", [True, False])
async def test_failure_cancels_the_sibling_and_raises_the_real_error(failing_first: bool) -> None:
    cancelled = asyncio.Event()

    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise UpstreamError("retrieval down")

    async def long_running() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    pair = (fails(), long_running()) if failing_first else (long_running(), fails())
    with pytest.raises(UpstreamError, match="retrieval down"):
        await gather_or_cancel(*pair)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_cancelling_the_caller_cancels_both() -> None:
    cancelled = 0

    async def long_running() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    task = asyncio.ensure_future(gather_or_cancel(long_running(), long_running()))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert cancelled == 2


class _Recorder:
    """Wraps a real component and logs when its calls start and end (no timings involved)."""

    def __init__(self, inner: object, method: str, log: list[str], label: str) -> None:
        self._inner, self._method, self._log, self._label = inner, method, log, label

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def wrapped(*args: object, **kwargs: object) -> object:
            self._log.append(f"{self._label}:start")
            try:
                return await attr(*args, **kwargs)
            finally:
                self._log.append(f"{self._label}:end")

        return wrapped


async def test_retrieval_and_pseudo_passage_overlap_on_real_models(
    settings: Settings, components: Components
) -> None:
    # Both stages must start before either ends: ordering, not a clock, so it holds under any load.
    events: list[str] = []
    generator = _Recorder(components.generator, "chat", events, "llm")
    retriever = _Recorder(components.retriever, "retrieve", events, "retrieve")
    pipe = Pipeline(
        settings,
        Components(retriever, components.selector, generator),  # type: ignore[arg-type]
    )
    result = await pipe.answer("who got the first nobel prize in physics")
    assert result.answer
    # the first llm call is the pseudo-passage, the second the answer
    first_end = min(events.index("retrieve:end"), events.index("llm:end"))
    assert {"retrieve:start", "llm:start"} <= set(events[:first_end])
    assert events[-2:] == ["llm:start", "llm:end"]


# --- Pipelined selection ------------------------------------------------------------------------
# The retrieved passages are scored while the pseudo-passage is still being written; the
# pseudo-passage is scored alone when it arrives. Overlap is proved by ordering (events), and the
# merged scores must equal one call over all k+1 candidates.

_HITS = [Retrieved(Passage(f"p{i}", f"Title {i}", f"text {i}"), i, 0.9 - i / 10) for i in range(4)]
_PSEUDO = "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics in 1901."


class _ListRetriever:
    name, version = "list-retriever", "1"

    def __init__(self, hits: list[Retrieved]) -> None:
        self.hits = hits

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        return self.hits[:k]

    async def close(self) -> None:
        return None


class _GatedGenerator:
    """Writes the pseudo-passage only once ``gate`` is set (never, if nobody sets it); answers
    at once. ``pseudo`` maps a question to its pseudo-passage (default: a fixed text)."""

    name, version = "gated-generator", "1"

    def __init__(self, gate: asyncio.Event | None = None, pseudo: dict[str, str] | None = None):
        self.gate, self.pseudo = gate, pseudo or {}

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        if message.startswith(prompts.PSEUDO_INSTRUCTION):
            if self.gate is not None:
                await self.gate.wait()
            question = message.rsplit("Question: ", 1)[-1]
            return self.pseudo.get(question, _PSEUDO)
        return "Röntgen"

    async def close(self) -> None:
        return None


class _LoggingSelector:
    """Scores by a fixed table (ties on purpose) and logs each call's candidate ids; sets
    ``scored_retrieved`` when it has scored retrieved passages."""

    name, version = "logging-selector", "1"

    def __init__(self, table: dict[str, float], fail_pseudo: bool = False) -> None:
        self.table, self.fail_pseudo = table, fail_pseudo
        self.calls: list[list[str]] = []
        self.scored_retrieved = asyncio.Event()

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        self.calls.append([c.id for c in candidates])
        if self.fail_pseudo and any(c.pseudo for c in candidates):
            raise UpstreamError("selector worker down", code="selector_down")
        if any(not c.pseudo for c in candidates):
            self.scored_retrieved.set()
        return [self.table[c.id] for c in candidates]

    async def close(self) -> None:
        return None


def _pipe(settings: Settings, selector: object, generator: object, **pipeline: object) -> Pipeline:
    s = settings.model_copy(
        update={"pipeline": settings.pipeline.model_copy(update=pipeline)}, deep=True
    )
    return Pipeline(s, Components(_ListRetriever(_HITS), selector, generator))  # type: ignore[arg-type]


# p1 and p2 tie with the pseudo-passage: stable order keeps retrieval order, the pseudo last.
_TABLE = {"p0": 0.5, "p1": 2.0, "p2": 2.0, "p3": -1.0, PSEUDO_ID: 2.0}


async def test_retrieved_passages_are_scored_while_the_pseudo_passage_is_written(
    settings: Settings,
) -> None:
    # The pseudo-passage waits until the selector has scored the retrieved passages: without
    # pipelining the selector would only run after the pseudo-passage, and this would hang.
    selector = _LoggingSelector(_TABLE)
    pipe = _pipe(settings, selector, _GatedGenerator(selector.scored_retrieved))
    result = await asyncio.wait_for(pipe.answer("who got the first nobel prize", top_n=2), 10)
    assert selector.calls == [["p0", "p1", "p2", "p3"], [PSEUDO_ID]]
    assert [c.passage.id for c in result.candidates] == ["p1", "p2", PSEUDO_ID, "p0", "p3"]
    assert [c.score for c in result.candidates] == [2.0, 2.0, 2.0, 0.5, -1.0]
    assert [c.selector_score for c in result.candidates] == [2.0, 2.0, 2.0, 0.5, -1.0]
    assert [s.passage.id for s in result.selected] == ["p1", "p2"]
    t = result.timings_ms
    assert t["select_retrieved"] > 0 and t["select_pseudo"] > 0 and t["select"] > 0
    assert not result.degraded


async def test_unpipelined_selection_scores_all_candidates_in_one_call(settings: Settings) -> None:
    selector = _LoggingSelector(_TABLE)
    pipe = _pipe(settings, selector, _GatedGenerator(), pipelined_selection=False)
    result = await pipe.answer("who got the first nobel prize", top_n=2)
    assert selector.calls == [["p0", "p1", "p2", "p3", PSEUDO_ID]]
    assert [c.passage.id for c in result.candidates] == ["p1", "p2", PSEUDO_ID, "p0", "p3"]
    t = result.timings_ms
    assert t["select"] > 0 and t["select_retrieved"] == t["select_pseudo"] == 0


async def test_pipelined_selection_without_retrieval_scores_the_pseudo_passage_alone(
    settings: Settings,
) -> None:
    class Down(_ListRetriever):
        async def retrieve(self, question: str, k: int) -> list[Retrieved]:
            raise UpstreamError("retriever worker down", code="retriever_down")

    selector = _LoggingSelector(_TABLE)
    pipe = _pipe(settings, selector, _GatedGenerator())
    pipe.c.retriever = Down([])
    result = await pipe.answer("who got the first nobel prize")
    assert selector.calls == [[PSEUDO_ID]]
    assert [d.kind for d in result.degraded] == ["retrieval_down"]
    assert [s.passage.id for s in result.selected] == [PSEUDO_ID]


async def test_pipelined_selection_drops_a_not_available_pseudo_passage(settings: Settings) -> None:
    selector = _LoggingSelector(_TABLE)
    q = "who got the first nobel prize"
    pipe = _pipe(settings, selector, _GatedGenerator(pseudo={q: "N/A"}))
    result = await pipe.answer(q, top_n=1)
    assert selector.calls == [["p0", "p1", "p2", "p3"]]  # nothing scored for "N/A"
    assert PSEUDO_ID not in [c.passage.id for c in result.candidates]
    assert result.timings_ms["select_pseudo"] == 0


@pytest.mark.parametrize("pipelined", [True, False])
async def test_a_failing_selector_part_degrades_to_retrieval_order(
    settings: Settings, pipelined: bool
) -> None:
    # The pseudo-passage's scoring fails: one selector_down entry, retrieval order, pseudo last.
    selector = _LoggingSelector(_TABLE, fail_pseudo=True)
    pipe = _pipe(settings, selector, _GatedGenerator(), pipelined_selection=pipelined)
    result = await pipe.answer("who got the first nobel prize", top_n=1)
    assert [d.kind for d in result.degraded] == ["selector_down"]
    assert [c.passage.id for c in result.candidates] == ["p0", "p1", "p2", "p3", PSEUDO_ID]
    assert result.candidates[-1].score == -1.0
    assert all(c.selector_score is None for c in result.candidates)  # nothing from the selector
    assert [c.score for c in result.candidates[:4]] == [h.score for h in _HITS]


async def test_pipelined_selection_does_not_call_a_selector_found_down_again(
    settings: Settings,
) -> None:
    # The retrieved passages' scoring fails before the pseudo-passage arrives: the pseudo-passage
    # is not sent to the selector that was just found down (it would wait for the same timeout).
    class DownForRetrieved(_LoggingSelector):
        async def score(self, question: str, candidates: list[Passage]) -> list[float]:
            self.calls.append([c.id for c in candidates])
            self.scored_retrieved.set()  # lets the pseudo-passage arrive only after the failure
            raise UpstreamError("selector worker down", code="selector_down")

    selector = DownForRetrieved(_TABLE)
    pipe = _pipe(settings, selector, _GatedGenerator(selector.scored_retrieved))
    result = await asyncio.wait_for(pipe.answer("who got the first nobel prize"), 10)
    assert selector.calls == [["p0", "p1", "p2", "p3"]]
    assert [d.kind for d in result.degraded] == ["selector_down"]
    assert [c.passage.id for c in result.candidates] == ["p0", "p1", "p2", "p3", PSEUDO_ID]


async def test_pipelined_selection_failure_without_fallback_cancels_the_pseudo_passage(
    settings: Settings,
) -> None:
    # The retrieved passages' scoring fails while the pseudo-passage is being written: with
    # fallback off the request fails at once and the generation is cancelled.
    cancelled = asyncio.Event()

    class Slow(_GatedGenerator):
        async def chat(self, message: str, *, max_new_tokens: int) -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "never"

    class Broken(_LoggingSelector):
        async def score(self, question: str, candidates: list[Passage]) -> list[float]:
            raise RuntimeError("secret detail")

    pipe = _pipe(settings, Broken(_TABLE), Slow(), fallback=False)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(pipe.answer("who got the first nobel prize"), 10)
    assert info.value.code == "select_failed"
    assert "secret" not in info.value.message
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_pipelined_selection_rejects_non_finite_scores(settings: Settings) -> None:
    selector = _LoggingSelector({**_TABLE, PSEUDO_ID: math.nan})
    pipe = _pipe(settings, selector, _GatedGenerator())
    result = await pipe.answer("who got the first nobel prize")
    assert [d.kind for d in result.degraded] == ["selector_down"]
    assert "non-finite" in result.degraded[0].message


def test_pipelined_selection_is_not_in_the_answer_cache_key(settings: Settings) -> None:
    on = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator())
    off = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator(), pipelined_selection=False)
    assert on._answer_key("q", 1) == off._answer_key("q", 1)


# Retrieval scores 0.9, 0.8, 0.7, 0.6 -> minmax 1, 2/3, 1/3, 0 (the pseudo-passage: 0); the
# table's selector scores 0.5, 2, 2, -1 and 2 -> minmax 0.5, 1, 1, 0 and 1.
@pytest.mark.parametrize(
    ("weight", "order", "scores"),
    [
        (0.5, ["p1", "p0", "p2", PSEUDO_ID, "p3"], [5 / 6, 0.75, 2 / 3, 0.5, 0.0]),
        (1.0, ["p0", "p1", "p2", "p3", PSEUDO_ID], [1.0, 2 / 3, 1 / 3, 0.0, 0.0]),
    ],
)
@pytest.mark.parametrize("pipelined", [True, False])
async def test_retrieval_weight_mixes_normalised_selector_and_retrieval_scores(
    settings: Settings, weight: float, order: list[str], scores: list[float], pipelined: bool
) -> None:
    pipe = _pipe(
        settings,
        _LoggingSelector(_TABLE),
        _GatedGenerator(),
        retrieval_weight=weight,
        pipelined_selection=pipelined,
    )
    result = await pipe.answer("who got the first nobel prize", top_n=2)
    assert [c.passage.id for c in result.candidates] == order
    assert [c.score for c in result.candidates] == pytest.approx(scores)
    assert [c.selector_score for c in result.candidates] == [_TABLE[i] for i in order]
    assert [s.passage.id for s in result.selected] == order[:2]
    # the retrieval scores themselves are reported unchanged beside the mix
    assert [c.retrieval_score for c in result.candidates if c.retrieval_rank is not None] == [
        h.score for h in sorted(_HITS, key=lambda h: order.index(h.passage.id))
    ]


# select_top=2: only p0 and p1 (and the pseudo-passage) are scored: selector 0.5, 2, 2 -> minmax
# 0, 1, 1 over them, p2 and p3 get 0; retrieval stays normalised over all four: 1, 2/3, 1/3, 0.
@pytest.mark.parametrize(
    ("weight", "order", "scores"),
    [
        (0.5, ["p1", "p0", PSEUDO_ID, "p2", "p3"], [5 / 6, 0.5, 0.5, 1 / 6, 0.0]),
        # the selector's own scores; the unscored after the scored, with its lowest score
        (0.0, ["p1", PSEUDO_ID, "p0", "p2", "p3"], [2.0, 2.0, 0.5, 0.5, 0.5]),
    ],
)
@pytest.mark.parametrize("pipelined", [True, False])
async def test_select_top_scores_the_retrievers_top_n_and_ranks_the_rest_after(
    settings: Settings, weight: float, order: list[str], scores: list[float], pipelined: bool
) -> None:
    selector = _LoggingSelector(_TABLE)
    pipe = _pipe(
        settings,
        selector,
        _GatedGenerator(),
        retrieval_weight=weight,
        pipelined_selection=pipelined,
        select_top=2,
        pseudo_passage=True,
    )
    result = await pipe.answer("who got the first nobel prize", top_n=2)
    scored = [["p0", "p1"], [PSEUDO_ID]] if pipelined else [["p0", "p1", PSEUDO_ID]]
    assert sorted(selector.calls) == sorted(scored)
    assert [c.passage.id for c in result.candidates] == order
    assert [c.score for c in result.candidates] == pytest.approx(scores)
    assert [c.selector_score for c in result.candidates] == [
        None if i in ("p2", "p3") else _TABLE[i] for i in order
    ]
    assert [s.passage.id for s in result.selected] == order[:2]


def test_select_top_is_in_the_answer_cache_key(settings: Settings) -> None:
    every = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator())
    top = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator(), select_top=2)
    assert every._answer_key("q", 1) != top._answer_key("q", 1)


def test_retrieval_weight_is_in_the_answer_cache_key(settings: Settings) -> None:
    alone = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator())
    mixed = _pipe(settings, _LoggingSelector(_TABLE), _GatedGenerator(), retrieval_weight=0.5)
    assert alone._answer_key("q", 1) != mixed._answer_key("q", 1)


def _dev_questions(n_per_file: int) -> dict[str, str]:
    """The first questions of every dev set, each with its first answer as pseudo-passage."""
    out = {}
    for path in sorted((REPO_ROOT / "data" / "questions").glob("*_dev.jsonl")):
        with path.open() as f:
            for _, line in zip(range(n_per_file), f, strict=False):
                row = json.loads(line)
                out[row["question"]] = f"{row['question']}? The answer is {row['answers'][0]}."
    return out


async def _equal_to_scoring_all_together(
    settings: Settings, retriever: object, selector: Selector, n_per_file: int
) -> None:
    questions = _dev_questions(n_per_file)
    generator = _GatedGenerator(pseudo=questions)
    results = {}
    for pipelined in (True, False):
        s = settings.model_copy(
            update={
                "pipeline": settings.pipeline.model_copy(update={"pipelined_selection": pipelined})
            },
            deep=True,
        )
        pipe = Pipeline(s, Components(retriever, selector, generator))  # type: ignore[arg-type]
        # Concurrently, as under load: pairs of several requests share the selector's batches.
        results[pipelined] = await asyncio.gather(*(pipe.answer(q, top_n=3) for q in questions))
    for q, on, off in zip(questions, results[True], results[False], strict=True):
        # The reference: one call over all k+1 candidates, alone.
        together = await selector.score(q, [c.passage for c in off.candidates])
        for got in (on, off):
            assert [c.passage.id for c in got.candidates] == [c.passage.id for c in off.candidates]
            np.testing.assert_allclose(
                [c.score for c in got.candidates], together, atol=1e-4, rtol=0
            )
            assert any(c.passage.pseudo for c in got.candidates)
        assert len(on.candidates) == settings.retrieval.k + 1
        assert [s.passage.id for s in on.selected] == [s.passage.id for s in off.selected]


async def test_pipelined_scores_equal_all_together_with_the_shipped_cross_encoder(
    settings: Settings, components: Components
) -> None:
    assert components.selector is not None
    assert components.selector.name == "cross-encoder:gainrag-minilm-l6"
    await _equal_to_scoring_all_together(settings, components.retriever, components.selector, 3)


async def test_pipelined_scores_equal_all_together_with_the_cosine_selector(
    settings: Settings, components: Components, encoder: BiEncoder, index_dir: Path
) -> None:
    selector = CosineSelector(encoder, PassageIndex.load(index_dir))
    try:
        await _equal_to_scoring_all_together(settings, components.retriever, selector, 8)
    finally:
        await selector.close()
