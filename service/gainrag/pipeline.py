"""The answer path: cache -> (retrieve || pseudo-passage) -> select -> generate.

Plain async code over the component interfaces, so it runs the same with in-process models or
remote workers. Retrieval and the pseudo-passage run concurrently: they are independent, and the
pseudo-passage (an LLM generation) is usually the slowest stage.

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
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gainrag import metrics
from gainrag.cache import Cache, cache_key
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
from gainrag.llm.base import Generator, prompt_tokens
from gainrag.retrieval.base import Retriever
from gainrag.selector.base import Selector
from gainrag.textcheck import check_text, is_blank
from gainrag.types import AnswerResult, Degradation, Passage, Retrieved, Scored

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

STAGES = ("retrieve", "pseudo", "select", "generate")
PSEUDO_ID = "pseudo"
# A dependency that is down, failing or too slow: these degrade; bad input and 429 do not.
_DEPENDENCY_FAILURES = (UnavailableError, UpstreamError, UpstreamTimeoutError)


@dataclass(frozen=True)
class CheckedQuery:
    """A question that passed every check: its text exactly as the models will see it."""

    question: str  # NFC, stripped
    top_n: int


@dataclass
class Components:
    """The models behind the pipeline; any may be absent when its stage is disabled."""

    retriever: Retriever | None
    selector: Selector | None
    generator: Generator
    cache: Cache | None = None

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
            pipeline=[o.retrieve, o.pseudo_passage, o.select],
            max_new_tokens=[llm.max_new_tokens_pseudo, llm.max_new_tokens_answer],
            max_passage_words=llm.max_passage_words,
        )
        return cache_key("answer", question, versions)

    async def _timed(self, stage: str, timings: dict[str, float], aw: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await aw
        except GainRAGError:
            raise
        except Exception as exc:
            # Unexpected backend failures become a 502 with a safe message; details go to the log.
            log.exception("stage %s failed", stage)
            raise UpstreamError(f"the {stage} stage failed", code=f"{stage}_failed") from exc
        finally:
            elapsed = time.perf_counter() - start
            timings[stage] = elapsed * 1000.0
            metrics.STAGE_SECONDS.labels(stage).observe(elapsed)

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
        question, top_n = q.question, q.top_n
        start = time.perf_counter()
        cache = self.c.cache
        key = self._answer_key(question, top_n) if cache is not None else None
        if cache is not None and key is not None and use_cache:
            hit = await cache.get("answer", key)
            if hit is not None:
                try:
                    result = AnswerResult.from_cache(hit)
                except (KeyError, TypeError):
                    log.warning("ignoring a cached answer of an unexpected shape")
                else:
                    result.timings_ms = dict.fromkeys(STAGES, 0.0)
                    result.timings_ms["total"] = (time.perf_counter() - start) * 1000.0
                    metrics.ANSWERS.labels("cache").inc()
                    return result
        try:
            async with asyncio.timeout(o.timeout_s):
                result = await self._answer(question, top_n, read_cache=use_cache)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"no answer within {o.timeout_s:g} s (GAINRAG_PIPELINE__TIMEOUT_S)"
            ) from exc
        metrics.ANSWERS.labels("pipeline").inc()
        if any(s.passage.pseudo for s in result.selected):
            metrics.PSEUDO_SELECTED.inc()
        if cache is not None and key is not None and not result.degraded:
            await cache.set("answer", key, result.to_cache())
        return result

    def _degrade(self, degraded: list[Degradation], kind: str, message: str) -> None:
        log.warning("degraded answer (%s): %s", kind, message)
        metrics.FALLBACKS.labels(kind).inc()
        degraded.append(Degradation(kind, message))

    async def _answer(self, question: str, top_n: int, *, read_cache: bool) -> AnswerResult:
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
        retrieved, pseudo_text = await gather_or_cancel(retrieve_aw, pseudo_aw)

        candidates: list[Scored] = [
            Scored(r.passage, r.score, retrieval_rank=r.rank, retrieval_score=r.score)
            for r in retrieved
        ]
        pseudo_kept = o.pseudo_passage and not prompts.is_not_available(pseudo_text)
        if pseudo_kept:  # its score comes from the selector (settings require one)
            candidates.append(Scored(Passage(PSEUDO_ID, "", pseudo_text.strip(), pseudo=True), 0.0))

        ranked = candidates  # retrieval order, the pseudo-passage last
        if o.select and candidates and self.c.selector is not None:
            try:
                scores = await self._timed(
                    "select",
                    timings,
                    self.c.selector.score(question, [s.passage for s in candidates]),
                )
                if not all(math.isfinite(x) for x in scores):
                    # e.g. fp16 overflow in a cross-encoder: ranking on NaN would be silently wrong
                    raise UpstreamError(
                        "the selector returned non-finite scores", code="select_failed"
                    )
            except _DEPENDENCY_FAILURES as exc:
                if not o.fallback:
                    raise
                self._degrade(
                    degraded,
                    "selector_down",
                    f"{exc.message}; candidates kept in retrieval order (scores are "
                    "retrieval scores; the pseudo-passage ranks last)",
                )
                if pseudo_kept:
                    candidates[-1].score = -1.0  # below any cosine of a retrieved passage
            else:
                for s, score in zip(candidates, scores, strict=True):
                    s.score = float(score)
                # Stable sort: ties keep retrieval order.
                ranked = sorted(candidates, key=lambda s: -s.score)
        selected = ranked[:top_n]

        answer = await self._timed(
            "generate",
            timings,
            self.c.generator.chat(
                prompts.answer_prompt(
                    question, [s.passage for s in selected], self.settings.llm.max_passage_words
                ),
                max_new_tokens=self.settings.llm.max_new_tokens_answer,
            ),
        )
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return AnswerResult(
            answer=prompts.clean_answer(answer),
            selected=selected,
            candidates=ranked,
            retrieved=retrieved,
            pseudo_passage=pseudo_text.strip() if o.pseudo_passage else None,
            timings_ms=timings,
            degraded=degraded,
        )


async def gather_or_cancel(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Run two awaitables concurrently; if one fails, cancel the other before raising.

    (``asyncio.gather`` would leave the sibling running, e.g. an LLM generation for a request
    that has already failed, using capacity that the in-flight limit no longer accounts for.)
    """
    t1, t2 = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        await asyncio.wait((t1, t2), return_when=asyncio.FIRST_EXCEPTION)
    finally:  # also when this request itself is cancelled (deadline, client gone)
        for t in (t1, t2):
            if not t.done():
                t.cancel()
    for t in (t1, t2):  # raise the real failure, not the sibling's cancellation
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return t1.result(), t2.result()


def build_components(settings: Settings) -> Components:
    """Build what the settings ask for (once, at start-up): remote clients where a worker URL is
    set, in-process models otherwise."""
    o, r, s, llm = settings.pipeline, settings.retrieval, settings.selector, settings.llm
    api_token = settings.worker.api_token
    worker_token = api_token.get_secret_value() if api_token is not None else None

    use_openai = llm.backend == "openai" or (llm.backend == "auto" and llm.base_url is not None)
    if use_openai:
        from gainrag.llm.openai_backend import OpenAIGenerator

        if not llm.base_url:
            raise ConfigurationError("GAINRAG_LLM__BACKEND=openai needs GAINRAG_LLM__BASE_URL")
        generator: Generator = OpenAIGenerator(llm)
    else:
        import torch

        from gainrag.models import prepare_llm

        if llm.threads > 0:
            torch.set_num_threads(llm.threads)
        generator = _build_generator(settings, prepare_llm(llm.model, llm.models_dir))

    kind = s.kind
    if kind == "auto":
        kind = "cross-encoder" if s.checkpoint is not None else "relevance"
    local_retrieval = o.retrieve and r.url is None
    local_selector = o.select and s.url is None
    encoder = None
    if local_retrieval or (local_selector and kind == "relevance"):
        from gainrag.retrieval.encoder import BiEncoder

        encoder = BiEncoder.from_settings(r)

    retriever: Retriever | None = None
    if o.retrieve and r.url is not None:
        from gainrag.retrieval.remote import RemoteRetriever

        retriever = RemoteRetriever(r.url, timeout_s=r.timeout_s, token=worker_token)
    elif local_retrieval:
        from gainrag.retrieval.local import LocalRetriever

        assert encoder is not None
        retriever = LocalRetriever.from_settings(r, encoder)

    selector: Selector | None = None
    if o.select and s.url is not None:
        from gainrag.selector.remote import RemoteSelector

        selector = RemoteSelector(s.url, timeout_s=s.timeout_s, token=worker_token)
    elif local_selector and kind == "cross-encoder":
        selector = build_cross_encoder(settings)
    elif local_selector:
        from gainrag.selector.relevance import RelevanceSelector

        assert encoder is not None
        index = getattr(retriever, "index", None)
        selector = RelevanceSelector(encoder, index, max_queue=s.max_queue)

    cache = None
    if settings.redis.url:
        cache = Cache(settings.redis)
    return Components(retriever=retriever, selector=selector, generator=generator, cache=cache)


def build_cross_encoder(settings: Settings) -> Selector:
    """The in-process cross-encoder selector of the settings (also the selector worker's model)."""
    from gainrag.selector.cross_encoder import CrossEncoderSelector

    s = settings.selector
    if s.checkpoint is None:
        raise ConfigurationError("selector kind 'cross-encoder' needs GAINRAG_SELECTOR__CHECKPOINT")
    if not (s.checkpoint / "config.json").is_file():
        raise ConfigurationError(
            f"no selector checkpoint at {s.checkpoint} (GAINRAG_SELECTOR__CHECKPOINT); "
            "train one with `gainrag train selector` or set "
            "GAINRAG_SELECTOR__KIND=relevance for the untrained fallback"
        )
    return CrossEncoderSelector(
        s.checkpoint,
        max_length=s.max_length,
        batch_size=s.batch_size,
        max_batch_pairs=s.max_batch_pairs,
        max_wait_s=s.max_wait_ms / 1000.0,
        max_queue=s.max_queue,
        dtype=s.dtype,
    )


def _build_generator(settings: Settings, path: Path) -> Generator:
    from gainrag.llm.transformers_backend import TransformersGenerator

    llm = settings.llm
    return TransformersGenerator(
        path,
        dtype=llm.dtype,
        max_input_tokens=llm.max_input_tokens,
        max_batch_size=llm.max_batch_size,
        max_wait_s=llm.max_wait_ms / 1000.0,
        max_queue=llm.max_queue,
    )
