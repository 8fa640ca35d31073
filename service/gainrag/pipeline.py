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
from dataclasses import dataclass, field
from typing import TypeVar

from gainrag import telemetry, tracing
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
from gainrag.retrieval.interface import Documents, Retriever
from gainrag.selector.interface import Selector
from gainrag.selector.ranking import rank
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

    @classmethod
    def of(cls, result: AnswerResult, question: str, start: float) -> Context:
        """The context of a finished (cached) result: what it was based on, ``cached`` set."""
        basis = {name: getattr(result, name) for name in _BASIS}
        return cls(
            question=question,
            timings_ms=dict(result.timings_ms),
            start=start,
            cached=True,
            **basis,
        )

    def result(self, answer: str) -> AnswerResult:
        """The complete result with ``answer``; stamps the total time."""
        self.timings_ms["total"] = (time.perf_counter() - self.start) * 1000.0
        basis = {name: getattr(self, name) for name in _BASIS}
        return AnswerResult(answer=answer, timings_ms=self.timings_ms, cached=self.cached, **basis)


# What a context and its result share, field for field (the rest: the answer, timings, flags).
_BASIS = ("selected", "candidates", "retrieved", "pseudo_passage", "degraded")


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
    # the documents API (/v1/documents); not used by answering, carried for the gateway's routes
    documents: Documents | None = None

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
        # documents first: its queued writes finish before the retriever closes the index
        for c in (self.documents, self.retriever, self.selector, self.generator, self.cache):
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
            with tracing.span(stage):
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
        q = question if isinstance(question, CheckedQuery) else self.check(question, top_n)
        # The same events as answer_stream, the LLM asked for its whole reply at once (one
        # request, and a reply the evaluation memo records); only the last event is kept.
        result: AnswerResult | None = None
        async for event in self._events(q, use_cache, stream=False):
            if isinstance(event, AnswerResult):
                result = event
        assert result is not None  # _events always ends with the result or raises
        return result

    def answer_stream(
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
        return self._events(q, use_cache, stream=True)

    async def _events(
        self, q: CheckedQuery, use_cache: bool, *, stream: bool
    ) -> AsyncGenerator[StreamEvent, None]:
        """The one answer path of :meth:`answer` and :meth:`answer_stream` (as vLLM's serving
        layer has one result generator for both): cache, context, generation, result, caching.
        ``stream`` only chooses how the LLM is asked: token by token, or for its whole reply."""
        start = time.perf_counter()
        key, hit = await self._cached(q, use_cache, start)
        if hit is not None:
            self._annotate(hit, q.top_n)
            yield Context.of(hit, q.question, start)
            if hit.answer:
                yield hit.answer
            yield hit
            return
        deadline = asyncio.get_running_loop().time() + self.options.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                ctx = await self._context(q.question, q.top_n, read_cache=use_cache)
        except TimeoutError as exc:
            raise self._timeout() from exc
        yield ctx
        cleaner = prompts.AnswerCleaner()
        async for text in self._generate(ctx, cleaner, deadline, stream=stream):
            yield text
        result = ctx.result(cleaner.sent)
        self._annotate(result, q.top_n)
        await self._finish(result, key)
        yield result

    def _annotate(self, result: AnswerResult, top_n: int) -> None:
        """What an operator needs on the request's span (the server span of the route)."""
        span = tracing.current_span()
        if not span.is_recording():
            return
        span.set_attributes(
            {
                "gainrag.k": self.settings.retrieval.k if self.options.retrieve else 0,
                "gainrag.top_n": top_n,
                "gainrag.candidates": len(result.candidates),
                "gainrag.selected": [s.passage.id for s in result.selected],
                "gainrag.cache_hit": result.cached,
                "gainrag.degraded": [d.kind for d in result.degraded],
                **{f"gainrag.model.{k}": v for k, v in self.models.items()},
            }
        )

    async def _generate(
        self, ctx: Context, cleaner: prompts.AnswerCleaner, deadline: float, *, stream: bool
    ) -> AsyncGenerator[str, None]:
        """The answer's cleaned text as it arrives (``cleaner.sent`` holds all of it after);
        timed as ``generate``; unexpected backend errors become a safe 502, as in
        :meth:`_timed`; the deadline bounds each wait for the LLM."""
        g, budget = self.c.generator, self.settings.llm.max_new_tokens_answer
        prompt = self._answer_prompt(ctx)
        raw = (
            stream_reply(g, prompt, max_new_tokens=budget)
            if stream
            else _one_delta(g.chat(prompt, max_new_tokens=budget))
        )
        # Not the current span across the yields below (a generator's context is its
        # consumer's): made current only around each wait for the LLM, so the HTTP call to the
        # LLM server is its child.
        span = tracing.tracer().start_span(
            "generate", attributes={"gainrag.max_new_tokens": budget, "gainrag.stream": stream}
        )
        deltas = 0
        start = time.perf_counter()
        try:
            if span.is_recording():  # counting the prompt's tokens costs a tokenizer pass
                n_in = prompt_tokens(g, prompt)
                if n_in is not None:
                    span.set_attribute("gainrag.tokens_in", n_in)
            while not cleaner.complete:
                try:
                    async with asyncio.timeout_at(deadline):
                        with tracing.use_span(span):
                            delta = await anext(raw)
                    deltas += 1
                except StopAsyncIteration:  # the reply's end, not an error of the span
                    break
                except TimeoutError as exc:
                    tracing.mark_error(span, exc)
                    raise self._timeout() from exc
                except GainRAGError as exc:
                    tracing.mark_error(span, exc)
                    raise
                except Exception as exc:
                    tracing.mark_error(span, exc)
                    log.exception("stage generate failed")
                    raise UpstreamError(
                        "the generate stage failed", code="generate_failed"
                    ) from exc
                if text := cleaner.feed(delta):
                    yield text
        finally:
            await raw.aclose()  # also when our consumer left: stops the decoding
            elapsed = time.perf_counter() - start
            ctx.timings_ms["generate"] = elapsed * 1000.0
            telemetry.STAGE_SECONDS.labels("generate").observe(elapsed)
            # streamed, one delta is one token of the LLM's reply; whole, the reply is one delta
            span.set_attribute("gainrag.tokens_out" if stream else "gainrag.replies", deltas)
            span.set_attribute("gainrag.answer_chars", len(cleaner.sent))
            span.end()
        if rest := cleaner.finish():
            yield rest

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
        with tracing.span("cache") as span:
            hit = await cache.get("answer", key)
            span.set_attribute("gainrag.cache_hit", hit is not None)
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

    def _degrade(self, degraded: list[Degradation], degradation: Degradation) -> None:
        log.warning("degraded answer (%s): %s", degradation.kind, degradation.message)
        telemetry.FALLBACKS.labels(degradation.kind).inc()
        degraded.append(degradation)

    def _answer_prompt(self, ctx: Context) -> str:
        return prompts.answer_prompt(
            ctx.question, [s.passage for s in ctx.selected], self.settings.llm.max_passage_words
        )

    async def _context(self, question: str, top_n: int, *, read_cache: bool) -> Context:
        """Everything before generation: gather the candidates and their scores
        (:meth:`_gather`), rank them (:func:`gainrag.selector.ranking.rank`, pure), select."""
        o = self.options
        g = _Gathering(question, read_cache)
        retrieved, pseudo_text, scores = await self._gather(g)
        pseudo_kept = o.pseudo_passage and not prompts.is_not_available(pseudo_text)
        failure = scores.message if isinstance(scores, GainRAGError) else None
        ranking = rank(
            retrieved,
            _pseudo_passage(pseudo_text) if pseudo_kept else None,
            None if isinstance(scores, GainRAGError) else scores,
            weight=o.retrieval_weight,
            selector_failure=failure,
        )
        for degradation in ranking.degraded:
            self._degrade(g.degraded, degradation)
        return Context(
            question=question,
            selected=ranking.candidates[:top_n],
            candidates=ranking.candidates,
            retrieved=retrieved,
            pseudo_passage=pseudo_text.strip() if o.pseudo_passage else None,
            timings_ms=g.timings,
            degraded=g.degraded,
            start=g.start,
        )

    async def _gather(
        self, g: _Gathering
    ) -> tuple[list[Retrieved], str, list[float | None] | GainRAGError | None]:
        """(retrieve -> select the retrieved) || (pseudo-passage -> select it): the retrieved
        passages, the pseudo-passage's text ("" without one) and the selector's scores in
        candidate order (None: no selection; an error: the selector failed, fallback on)."""
        o = self.options
        pipelined = o.pipelined_selection and self._selector is not None
        (retrieved, scored_r), (pseudo_text, scored_p) = await gather_or_cancel(
            self._retrieved_branch(g, pipelined), self._pseudo_branch(g, pipelined)
        )
        pseudo_kept = o.pseudo_passage and not prompts.is_not_available(pseudo_text)
        if pipelined:
            parts = [p for p in (scored_r, scored_p) if p is not None]
            if not parts:
                return retrieved, pseudo_text, None
            # The critical path's selection: what the retrieved passages' scoring did not hide
            # behind the pseudo-passage, plus the pseudo-passage's own scoring.
            elapsed = time.perf_counter() - max(g.arrived.values())
            g.timings["select"] = elapsed * 1000.0
            telemetry.STAGE_SECONDS.labels("select").observe(elapsed)
            failed = next((p for p in parts if isinstance(p, GainRAGError)), None)
            return (
                retrieved,
                pseudo_text,
                failed or _in_candidate_order(scored_r, scored_p, len(retrieved)),
            )
        if self._selector is None or not (retrieved or pseudo_kept):
            return retrieved, pseudo_text, None
        scored = self._to_score(retrieved)
        pseudo = [_pseudo_passage(pseudo_text)] if pseudo_kept else []
        together = await self._score(g, "select", [r.passage for r in scored] + pseudo)
        if isinstance(together, GainRAGError):
            return retrieved, pseudo_text, together
        n = len(scored)
        return (
            retrieved,
            pseudo_text,
            _in_candidate_order(together[:n], together[n:] or None, len(retrieved)),
        )

    @property
    def _selector(self) -> Selector | None:
        return self.c.selector if self.options.select else None

    def _to_score(self, retrieved: list[Retrieved]) -> list[Retrieved]:
        """The retriever's top ``select_top`` only: the rest keep their retrieval scores and
        rank after them (docs/evaluation.md has what it costs in acc)."""
        n = self.options.select_top
        return retrieved[:n] if n else retrieved

    async def _retrieve(self, g: _Gathering) -> list[Retrieved]:
        o = self.options
        if not o.retrieve or self.c.retriever is None:
            return []
        aw = self.c.retriever.retrieve(g.question, self.settings.retrieval.k)
        try:
            return await self._timed("retrieve", g.timings, aw)
        except _DEPENDENCY_FAILURES as exc:
            if not o.fallback:
                raise
            # The pseudo-passage keeps going: it is the answer's only context now.
            basis = "the pseudo-passage alone" if o.pseudo_passage else "no passage"
            message = f"{exc.message}; answered from {basis}"
            self._degrade(g.degraded, Degradation("retrieval_down", message))
            return []

    async def _score(
        self, g: _Gathering, stage: str, passages: list[Passage]
    ) -> list[float] | GainRAGError:
        """Score ``passages``; a failing selector is returned (fallback) or raised."""
        selector = self._selector
        assert selector is not None
        if g.failures:  # the other branch already found the selector down: do not wait on it
            return g.failures[0]
        try:
            scores = await self._timed(
                stage, g.timings, selector.score(g.question, passages), failure="select"
            )
            if not all(math.isfinite(x) for x in scores):
                # e.g. fp16 overflow in a cross-encoder: ranking on NaN would be silently wrong
                raise UpstreamError("the selector returned non-finite scores", code="select_failed")
        except _DEPENDENCY_FAILURES as exc:
            if not self.options.fallback:
                raise  # gather_or_cancel then cancels the sibling branch
            g.failures.append(exc)
            return exc
        return scores

    async def _retrieved_branch(
        self, g: _Gathering, pipelined: bool
    ) -> tuple[list[Retrieved], list[float] | GainRAGError | None]:
        retrieved = await self._retrieve(g)
        g.arrived["retrieve"] = time.perf_counter()
        if not pipelined or not retrieved:
            return retrieved, None
        passages = [r.passage for r in self._to_score(retrieved)]
        return retrieved, await self._score(g, "select_retrieved", passages)

    async def _pseudo_branch(
        self, g: _Gathering, pipelined: bool
    ) -> tuple[str, list[float] | GainRAGError | None]:
        o = self.options
        if not o.pseudo_passage:
            g.arrived["pseudo"] = time.perf_counter()
            return "", None
        text = await self._timed("pseudo", g.timings, self._pseudo(g.question, g.read_cache))
        g.arrived["pseudo"] = time.perf_counter()
        if not pipelined or prompts.is_not_available(text):
            return text, None
        return text, await self._score(g, "select_pseudo", [_pseudo_passage(text)])


@dataclass
class _Gathering:
    """One request's state while its candidates are gathered: timings, degradations, the
    selector failure one branch saw (the other then does not wait on it), arrival times."""

    question: str
    read_cache: bool
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    degraded: list[Degradation] = field(default_factory=list)
    failures: list[GainRAGError] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)


async def _one_delta(reply: Awaitable[str]) -> AsyncGenerator[str, None]:
    """A whole reply as a stream of one delta (none when it is empty)."""
    text = await reply
    if text:
        yield text
