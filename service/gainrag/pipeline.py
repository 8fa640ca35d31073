"""The answer path: cache -> ((retrieve -> select k) || (pseudo-passage -> select 1)) -> generate.

Plain async code over the component interfaces, so it runs the same with in-process models or
remote workers. Retrieval and the pseudo-passage run concurrently: they are independent, and the
pseudo-passage (an LLM generation) is usually the slowest stage. With pipelined selection (the
default, ``pipeline.pipelined_selection``) the selector scores the k retrieved passages as soon as
retrieval returns, while the pseudo-passage is still being written, and the pseudo-passage alone
when it arrives; the two score lists are merged. A selector scores each candidate independently of
the others (a cross-encoder reads one (question, passage) pair; cosine compares two vectors), so
the scores equal scoring all k+1 together, and the critical path shrinks from
``max(retrieve, pseudo) + select(k+1) + generate`` to
``max(retrieve + select(k), pseudo + select(1)) + generate``. With ``pipeline.retrieval_weight``
> 0 the ranking mixes the selector's scores with the retriever's (``selector/fusion.py``).

Every check that needs no model runs first, in :meth:`Pipeline.check` (the gateway calls it before
a request takes an in-flight slot): text, length in characters and in generator tokens, top_n and
a bound on the answer prompt. Its :class:`CheckedQuery` is what :meth:`Pipeline.answer` takes.

Failure policy (``pipeline.fallback``, on by default): retrieval down -> answer from the
pseudo-passage alone; selector down -> retrieval order; both are listed in ``degraded``, counted
in ``gainrag_fallbacks_total`` and never cached. LLM down -> 503 (nothing can answer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from gainrag import telemetry
from gainrag.cache_interface import CacheStore, cache_key
from gainrag.concurrency import gather_or_cancel
from gainrag.config import PipelineSettings, Settings
from gainrag.errors import (
    ConfigurationError,
    GainRAGError,
    UnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
    ValidationFailedError,
)
from gainrag.llm import prompts
from gainrag.llm.interface import Generator, prompt_tokens, stream_reply
from gainrag.retrieval.interface import Retriever
from gainrag.selector.fusion import fuse
from gainrag.selector.interface import Selector
from gainrag.textcheck import check_text, is_blank
from gainrag.types import PSEUDO_ID, AnswerResult, Degradation, Passage, Retrieved, Scored

log = logging.getLogger(__name__)
T = TypeVar("T")

# ``select`` is the selection time on the critical path: from the moment both retrieval and the
# pseudo-passage were in until the ranking was ready (with pipelined selection, what the k
# retrieved passages' scoring did not hide behind the pseudo-passage, plus the pseudo-passage's
# own scoring; without it, the one k+1 call). ``select_retrieved`` and ``select_pseudo`` are the
# wall times of the two pipelined calls (0 when not pipelined or when that part had nothing to
# score), so ``total ~= max(retrieve, pseudo) + select + generate`` holds in both modes.
STAGES = ("retrieve", "pseudo", "select", "select_retrieved", "select_pseudo", "generate")
# A dependency that is down, failing or too slow: these degrade; bad input and 429 do not.
_DEPENDENCY_FAILURES = (UnavailableError, UpstreamError, UpstreamTimeoutError)


@dataclass(frozen=True)
class CheckedQuery:
    """A question that passed every check: its text exactly as the models will see it."""

    question: str  # NFC, stripped
    top_n: int


@dataclass
class Context:
    """What the answer will be based on: the pipeline up to selection (timings so far)."""

    question: str
    selected: list[Scored]
    candidates: list[Scored]  # ranked, best first
    retrieved: list[Retrieved]
    pseudo_passage: str | None
    timings_ms: dict[str, float]
    degraded: list[Degradation]
    start: float  # perf_counter at the start of the request
    cached: bool = False

    def result(self, answer: str) -> AnswerResult:
        """The complete result with ``answer``; stamps the total time."""
        self.timings_ms["total"] = (time.perf_counter() - self.start) * 1000.0
        return AnswerResult(
            answer=answer,
            selected=self.selected,
            candidates=self.candidates,
            retrieved=self.retrieved,
            pseudo_passage=self.pseudo_passage,
            timings_ms=self.timings_ms,
            degraded=self.degraded,
            cached=self.cached,
        )


StreamEvent = Context | str | AnswerResult
"""What :meth:`Pipeline.answer_stream` yields: the context, answer deltas, the result."""


@dataclass
class Components:
    """The models behind the pipeline; any may be absent when its stage is disabled.

    :func:`gainrag.wiring.build_components` builds them from the settings; tests and benchmarks
    pass stand-ins."""

    retriever: Retriever | None
    selector: Selector | None
    generator: Generator
    cache: CacheStore | None = None

    async def refresh(self) -> None:
        """Ask remote workers for their model versions (best effort: a worker may be down)."""
        for c in (self.retriever, self.selector):
            refresh = getattr(c, "refresh", None)
            if refresh is None:
                continue
            try:
                await refresh()
            except GainRAGError as exc:
                log.warning("could not read versions from a worker: %s", exc.message)

    async def close(self) -> None:
        """Close every component."""
        for c in (self.retriever, self.selector, self.generator, self.cache):
            if c is not None:
                await c.close()


def _pseudo_passage(text: str) -> Passage:
    """The pseudo-passage as a candidate (the same text whether scored alone or with others)."""
    return Passage(PSEUDO_ID, "", text.strip(), pseudo=True)


def _in_candidate_order(
    retrieved: list[float] | GainRAGError | None,
    pseudo: list[float] | GainRAGError | None,
    n_retrieved: int,
) -> list[float | None]:
    """One selector score per candidate (retrieved passages, then the pseudo-passage), None for
    the retrieved passages below ``pipeline.select_top``."""
    own = retrieved if isinstance(retrieved, list) else []
    tail = pseudo if isinstance(pseudo, list) else []
    return [*own, *[None] * (n_retrieved - len(own)), *tail]


class Pipeline:
    """GainRAG inference over a set of components."""

    def __init__(self, settings: Settings, components: Components) -> None:
        self.settings = settings
        self.options: PipelineSettings = settings.pipeline
        self.c = components
        if self.options.retrieve and components.retriever is None:
            raise ConfigurationError("retrieval is enabled but no retriever was built")
        if self.options.select and components.selector is None:
            raise ConfigurationError("selection is enabled but no selector was built")

    @property
    def models(self) -> dict[str, str]:
        """Names and versions of everything that shapes an answer."""
        c = self.c
        return {
            "retriever": c.retriever.name if c.retriever else "none",
            "index_version": c.retriever.version if c.retriever else "none",
            "selector": c.selector.name if c.selector and self.options.select else "none",
            "selector_version": c.selector.version
            if c.selector and self.options.select
            else "none",
            "generator": c.generator.name,
            "generator_version": c.generator.version,
            "prompt_version": prompts.PROMPT_VERSION,
        }

    def _answer_key(self, question: str, top_n: int) -> str | None:
        """Cache key of an answer, or None while a remote worker's version is unknown."""
        versions: dict[str, object] = dict(self.models)
        if "unknown" in versions.values():
            return None
        o, llm = self.options, self.settings.llm
        versions.update(
            top_n=top_n,
            k=self.settings.retrieval.k if o.retrieve else 0,
            pipeline=[o.retrieve, o.pseudo_passage, o.select, o.retrieval_weight, o.select_top],
            max_new_tokens=[llm.max_new_tokens_pseudo, llm.max_new_tokens_answer],
            max_passage_words=llm.max_passage_words,
        )
        # pipeline.pipelined_selection is deliberately not in the key: it changes when the
        # selector runs, not what it computes (each candidate's score is independent of the
        # others; tests/test_pipeline.py checks equality at 1e-4 with the real selectors), so
        # both modes produce the same ranking and answer and may share cached answers.
        return cache_key("answer", question, versions)

    async def _timed(
        self, stage: str, timings: dict[str, float], aw: Awaitable[T], *, failure: str = ""
    ) -> T:
        """Await ``aw``, recording its wall time as ``stage``; ``failure`` names the stage in
        the error of an unexpected exception (default ``stage``)."""
        start = time.perf_counter()
        try:
            return await aw
        except GainRAGError:
            raise
        except Exception as exc:
            # Unexpected backend failures become a 502 with a safe message; details go to the log.
            log.exception("stage %s failed", stage)
            name = failure or stage
            raise UpstreamError(f"the {name} stage failed", code=f"{name}_failed") from exc
        finally:
            elapsed = time.perf_counter() - start
            timings[stage] = elapsed * 1000.0
            telemetry.STAGE_SECONDS.labels(stage).observe(elapsed)

    async def _pseudo(self, question: str, read_cache: bool) -> str:
        g, budget = self.c.generator, self.settings.llm.max_new_tokens_pseudo
        cache, key = self.c.cache, None
        if cache is not None:
            key = cache_key(
                "pseudo",
                question,
                {"g": g.name, "gv": g.version, "p": prompts.PROMPT_VERSION, "max": budget},
            )
            if read_cache:
                hit = await cache.get("pseudo", key)
                if isinstance(hit, str):
                    return hit
        text = await g.chat(prompts.pseudo_prompt(question), max_new_tokens=budget)
        if cache is not None and key is not None:
            await cache.set("pseudo", key, text)
        return text

    def check(self, question: str, top_n: int | None = None) -> CheckedQuery:
        """Every validation that needs no model; raises ValidationFailedError (422).

        Synchronous and cheap (one tokenisation of the question with the generator's tokenizer,
        a few hundred microseconds), so the gateway runs it before a request takes an in-flight
        slot or a place in a batch.
        """
        o, api = self.options, self.settings.api
        if is_blank(question):
            raise ValidationFailedError(
                "'question' must contain text; it is empty or whitespace "
                "(or only invisible characters)",
                code="empty_question",
            )
        if len(question) > api.max_question_chars:
            raise ValidationFailedError(
                f"'question' is {len(question)} characters; the limit is {api.max_question_chars} "
                "(GAINRAG_API__MAX_QUESTION_CHARS)",
                code="question_too_long",
            )
        question = check_text("'question'", question).strip()
        top_n = o.top_n if top_n is None else top_n
        if not 1 <= top_n <= o.max_top_n:
            raise ValidationFailedError(
                f"'top_n' must be between 1 and {o.max_top_n}, got {top_n}",
                code="top_n_out_of_range",
            )
        self._check_tokens(question, top_n)
        return CheckedQuery(question, top_n)

    def _check_tokens(self, question: str, top_n: int) -> None:
        """Question and answer-prompt budgets in generator tokens (skipped when the backend
        cannot count locally, i.e. the OpenAI backend: its server enforces its context)."""
        g, api, llm = self.c.generator, self.settings.api, self.settings.llm
        n = prompt_tokens(g, question)
        if n is None:
            return
        if n > api.max_question_tokens:
            raise ValidationFailedError(
                f"'question' is {n} tokens; the limit is {api.max_question_tokens} "
                "(GAINRAG_API__MAX_QUESTION_TOKENS)",
                code="question_too_long",
            )
        # The answer prompt with top_n passages, each budgeted at passage_token_reserve tokens:
        # passages are not known yet, so this is a bound on typical passages (the shipped corpus'
        # 200-word passages are <= 300 tokens for 98% of them). The generator still checks the
        # exact prompt before generating.
        o = self.options
        most = (self.settings.retrieval.k if o.retrieve else 0) + (1 if o.pseudo_passage else 0)
        passages = min(top_n, most)
        empty = [Passage("", "", "")] * passages
        shell = prompt_tokens(g, prompts.answer_prompt(question, empty, llm.max_passage_words))
        bound = (shell or 0) + passages * api.passage_token_reserve
        pseudo = prompt_tokens(g, prompts.pseudo_prompt(question)) if o.pseudo_passage else 0
        worst = max(bound, pseudo or 0)
        if worst > llm.max_input_tokens:
            raise ValidationFailedError(
                f"the prompt for this question with top_n={top_n} would be about {worst} tokens "
                f"({n} of them the question, {api.passage_token_reserve} per passage), over the "
                f"{llm.max_input_tokens}-token limit (GAINRAG_LLM__MAX_INPUT_TOKENS); "
                "ask a shorter question or for fewer passages",
                code="prompt_too_long",
            )

    async def answer(
        self,
        question: str | CheckedQuery,
        *,
        top_n: int | None = None,
        use_cache: bool = True,
    ) -> AnswerResult:
        """Answer one question; raises GainRAGError subclasses on bad input or failures.

        ``question`` is a :class:`CheckedQuery` from :meth:`check` (then ``top_n`` is ignored)
        or a raw question that is checked here. ``use_cache=False`` (the client's
        ``Cache-Control: no-cache``) skips cache reads but stores the fresh result.
        """
        o = self.options
        q = question if isinstance(question, CheckedQuery) else self.check(question, top_n)
        key, hit = await self._cached(q, use_cache)
        if hit is not None:
            return hit
        try:
            async with asyncio.timeout(o.timeout_s):
                result = await self._answer(q.question, q.top_n, read_cache=use_cache)
        except TimeoutError as exc:
            raise self._timeout() from exc
        await self._finish(result, key)
        return result

    async def answer_stream(
        self, q: CheckedQuery, *, use_cache: bool = True
    ) -> AsyncGenerator[StreamEvent, None]:
        """:meth:`answer` as events: the :class:`Context` (the citation, before any token), then
        the answer's text deltas, then the :class:`AnswerResult` (the same as :meth:`answer`'s).

        The deltas are the cleaned answer (:class:`prompts.AnswerCleaner`): they concatenate to
        ``result.answer`` exactly, and generation stops once the answer's line is complete.
        A cached answer is its context, the whole answer as one delta, and the result. Closing
        the iterator (the client left) closes the generator's stream, which stops decoding.
        The pipeline deadline covers each step, not the consumer's time between them.
        """
        o = self.options
        start = time.perf_counter()
        key, hit = await self._cached(q, use_cache, start)
        if hit is not None:
            yield Context(
                question=q.question,
                selected=hit.selected,
                candidates=hit.candidates,
                retrieved=hit.retrieved,
                pseudo_passage=hit.pseudo_passage,
                timings_ms=dict(hit.timings_ms),
                degraded=hit.degraded,
                start=start,
                cached=True,
            )
            if hit.answer:
                yield hit.answer
            yield hit
            return
        deadline = asyncio.get_running_loop().time() + o.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                ctx = await self._context(q.question, q.top_n, read_cache=use_cache)
        except TimeoutError as exc:
            raise self._timeout() from exc
        yield ctx
        cleaner = prompts.AnswerCleaner()
        gen_start = time.perf_counter()
        deltas = stream_reply(
            self.c.generator,
            self._answer_prompt(ctx),
            max_new_tokens=self.settings.llm.max_new_tokens_answer,
        )
        try:
            while not cleaner.complete:
                try:
                    async with asyncio.timeout_at(deadline):
                        raw = await anext(deltas)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise self._timeout() from exc
                except GainRAGError:
                    raise
                except Exception as exc:  # as _timed does for the non-streaming path
                    log.exception("stage generate failed")
                    raise UpstreamError(
                        "the generate stage failed", code="generate_failed"
                    ) from exc
                if text := cleaner.feed(raw):
                    yield text
        finally:
            await deltas.aclose()  # also when our consumer left: stops the decoding
            elapsed = time.perf_counter() - gen_start
            ctx.timings_ms["generate"] = elapsed * 1000.0
            telemetry.STAGE_SECONDS.labels("generate").observe(elapsed)
        if rest := cleaner.finish():
            yield rest
        result = ctx.result(cleaner.sent)
        await self._finish(result, key)
        yield result

    def _timeout(self) -> UpstreamTimeoutError:
        o = self.options
        return UpstreamTimeoutError(
            f"no answer within {o.timeout_s:g} s (GAINRAG_PIPELINE__TIMEOUT_S)"
        )

    async def _cached(
        self, q: CheckedQuery, use_cache: bool, start: float | None = None
    ) -> tuple[str | None, AnswerResult | None]:
        """The answer's cache key and its cached result, if any (``cached`` set, zero timings)."""
        start = time.perf_counter() if start is None else start
        cache = self.c.cache
        key = self._answer_key(q.question, q.top_n) if cache is not None else None
        if cache is None or key is None or not use_cache:
            return key, None
        hit = await cache.get("answer", key)
        if hit is None:
            return key, None
        try:
            result = AnswerResult.from_cache(hit)
        except (KeyError, TypeError):
            log.warning("ignoring a cached answer of an unexpected shape")
            return key, None
        result.timings_ms = dict.fromkeys(STAGES, 0.0)
        result.timings_ms["total"] = (time.perf_counter() - start) * 1000.0
        telemetry.ANSWERS.labels("cache").inc()
        return key, result

    async def _finish(self, result: AnswerResult, key: str | None) -> None:
        """Count a computed answer and cache it (never a degraded one)."""
        telemetry.ANSWERS.labels("pipeline").inc()
        if any(s.passage.pseudo for s in result.selected):
            telemetry.PSEUDO_SELECTED.inc()
        if self.c.cache is not None and key is not None and not result.degraded:
            await self.c.cache.set("answer", key, result.to_cache())

    def _degrade(self, degraded: list[Degradation], kind: str, message: str) -> None:
        log.warning("degraded answer (%s): %s", kind, message)
        telemetry.FALLBACKS.labels(kind).inc()
        degraded.append(Degradation(kind, message))

    async def _answer(self, question: str, top_n: int, *, read_cache: bool) -> AnswerResult:
        ctx = await self._context(question, top_n, read_cache=read_cache)
        answer = await self._timed(
            "generate",
            ctx.timings_ms,
            self.c.generator.chat(
                self._answer_prompt(ctx), max_new_tokens=self.settings.llm.max_new_tokens_answer
            ),
        )
        return ctx.result(prompts.clean_answer(answer))

    def _answer_prompt(self, ctx: Context) -> str:
        return prompts.answer_prompt(
            ctx.question, [s.passage for s in ctx.selected], self.settings.llm.max_passage_words
        )

    async def _context(self, question: str, top_n: int, *, read_cache: bool) -> Context:
        """Everything before generation: (retrieve || pseudo-passage) -> select -> ``selected``."""
        o = self.options
        timings = dict.fromkeys(STAGES, 0.0)
        degraded: list[Degradation] = []
        start = time.perf_counter()

        async def no_retrieval() -> list[Retrieved]:
            return []

        async def no_pseudo() -> str:
            return ""

        async def retrieve(retriever: Retriever) -> list[Retrieved]:
            aw = retriever.retrieve(question, self.settings.retrieval.k)
            try:
                return await self._timed("retrieve", timings, aw)
            except _DEPENDENCY_FAILURES as exc:
                if not o.fallback:
                    raise
                # The pseudo-passage keeps going: it is the answer's only context now.
                basis = "the pseudo-passage alone" if o.pseudo_passage else "no passage"
                self._degrade(degraded, "retrieval_down", f"{exc.message}; answered from {basis}")
                return []

        retrieve_aw = (
            retrieve(self.c.retriever)
            if o.retrieve and self.c.retriever is not None
            else no_retrieval()
        )
        pseudo_aw = (
            self._timed("pseudo", timings, self._pseudo(question, read_cache))
            if o.pseudo_passage
            else no_pseudo()
        )
        selector = self.c.selector if o.select else None
        pipelined = o.pipelined_selection and selector is not None
        # When each input arrived (perf_counter), for the critical-path selection time.
        arrived: dict[str, float] = {}

        failures: list[GainRAGError] = []

        def to_score(retrieved: list[Retrieved]) -> list[Retrieved]:
            # The retriever's top select_top only: the rest keep their retrieval scores and
            # rank after them (fusion.fuse); docs/evaluation.md has what it costs in acc.
            return retrieved[: o.select_top] if o.select_top else retrieved

        async def score(stage: str, passages: list[Passage]) -> list[float] | GainRAGError:
            """Score ``passages``; a failing selector is returned (fallback) or raised."""
            assert selector is not None
            if failures:  # the other part already found the selector down: do not wait on it
                return failures[0]
            try:
                scores = await self._timed(
                    stage, timings, selector.score(question, passages), failure="select"
                )
                if not all(math.isfinite(x) for x in scores):
                    # e.g. fp16 overflow in a cross-encoder: ranking on NaN would be silently wrong
                    raise UpstreamError(
                        "the selector returned non-finite scores", code="select_failed"
                    )
            except _DEPENDENCY_FAILURES as exc:
                if not o.fallback:
                    raise  # gather_or_cancel then cancels the sibling branch
                failures.append(exc)
                return exc
            return scores

        async def retrieved_branch() -> tuple[list[Retrieved], list[float] | GainRAGError | None]:
            retrieved = await retrieve_aw
            arrived["retrieve"] = time.perf_counter()
            if not pipelined or not retrieved:
                return retrieved, None
            return retrieved, await score(
                "select_retrieved", [r.passage for r in to_score(retrieved)]
            )

        async def pseudo_branch() -> tuple[str, list[float] | GainRAGError | None]:
            text = await pseudo_aw
            arrived["pseudo"] = time.perf_counter()
            if not pipelined or not o.pseudo_passage or prompts.is_not_available(text):
                return text, None
            return text, await score("select_pseudo", [_pseudo_passage(text)])

        (retrieved, scored_r), (pseudo_text, scored_p) = await gather_or_cancel(
            retrieved_branch(), pseudo_branch()
        )

        candidates: list[Scored] = [
            Scored(r.passage, r.score, retrieval_rank=r.rank, retrieval_score=r.score)
            for r in retrieved
        ]
        pseudo_kept = o.pseudo_passage and not prompts.is_not_available(pseudo_text)
        if pseudo_kept:  # its score comes from the selector (settings require one)
            candidates.append(Scored(_pseudo_passage(pseudo_text), 0.0))

        outcome: list[float | None] | GainRAGError | None = None
        if pipelined and (scored_r is not None or scored_p is not None):
            parts = [p for p in (scored_r, scored_p) if p is not None]
            failed = next((p for p in parts if isinstance(p, GainRAGError)), None)
            # retrieved passages' scores first, the pseudo-passage's last: the candidates' order
            outcome = failed or _in_candidate_order(scored_r, scored_p, len(retrieved))
            elapsed = time.perf_counter() - max(arrived.values())
            timings["select"] = elapsed * 1000.0
            telemetry.STAGE_SECONDS.labels("select").observe(elapsed)
        elif not pipelined and selector is not None and candidates:
            scored = to_score(retrieved)
            together = await score(
                "select",
                [r.passage for r in scored] + [s.passage for s in candidates[len(retrieved) :]],
            )
            outcome = (
                together
                if isinstance(together, GainRAGError)
                else _in_candidate_order(
                    together[: len(scored)], together[len(scored) :] or None, len(retrieved)
                )
            )

        ranked = candidates  # retrieval order, the pseudo-passage last
        if isinstance(outcome, GainRAGError):
            self._degrade(
                degraded,
                "selector_down",
                f"{outcome.message}; candidates kept in retrieval order (scores are "
                "retrieval scores; the pseudo-passage ranks last)",
            )
            if pseudo_kept:
                candidates[-1].score = -1.0  # below any cosine of a retrieved passage
        elif outcome is not None:
            # Keep part of the retriever's judgement (selector.fusion says why); at weight 0 the
            # same call ranks by the selector alone, unscored passages after the scored ones.
            ranking = fuse(outcome, [s.retrieval_score for s in candidates], o.retrieval_weight)
            if o.retrieval_weight == 0.0:  # the selector's own scores (unscored: its lowest)
                lowest = min((x for x in outcome if x is not None), default=0.0)
                ranking = [lowest if x is None else x for x in outcome]
            for s, x, r in zip(candidates, outcome, ranking, strict=True):
                s.selector_score, s.score = (None if x is None else float(x)), float(r)
            # Stable sort: scored first; ties keep retrieval order, the pseudo-passage last.
            ranked = sorted(candidates, key=lambda s: (s.selector_score is None, -s.score))
        return Context(
            question=question,
            selected=ranked[:top_n],
            candidates=ranked,
            retrieved=retrieved,
            pseudo_passage=pseudo_text.strip() if o.pseudo_passage else None,
            timings_ms=timings,
            degraded=degraded,
            start=start,
        )
