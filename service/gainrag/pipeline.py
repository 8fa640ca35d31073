"""The answer path: (retrieve || pseudo-passage) -> select -> generate.

Plain async code over the component interfaces, so it runs the same with in-process models or
remote workers. Retrieval and the pseudo-passage run concurrently: they are independent, and the
pseudo-passage (an LLM generation) is usually the slowest stage.
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

from gainrag.config import PipelineSettings, Settings
from gainrag.errors import (
    ConfigurationError,
    GainRAGError,
    UpstreamError,
    UpstreamTimeoutError,
    ValidationFailedError,
)
from gainrag.llm import prompts
from gainrag.llm.base import Generator
from gainrag.retrieval.base import Retriever
from gainrag.selector.base import Selector
from gainrag.types import AnswerResult, Passage, Retrieved, Scored

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

STAGES = ("retrieve", "pseudo", "select", "generate")
PSEUDO_ID = "pseudo"


@dataclass
class Components:
    """The models behind the pipeline; any may be absent when its stage is disabled."""

    retriever: Retriever | None
    selector: Selector | None
    generator: Generator

    async def close(self) -> None:
        """Close every component."""
        for c in (self.retriever, self.selector, self.generator):
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
            timings[stage] = (time.perf_counter() - start) * 1000.0

    async def _pseudo(self, question: str) -> str:
        return await self.c.generator.chat(
            prompts.pseudo_prompt(question),
            max_new_tokens=self.settings.llm.max_new_tokens_pseudo,
        )

    async def answer(self, question: str, *, top_n: int | None = None) -> AnswerResult:
        """Answer one question; raises GainRAGError subclasses on bad input or failures."""
        o = self.options
        limit = self.settings.api.max_question_chars
        if not question.strip():
            raise ValidationFailedError(
                "'question' must contain text; it is empty or whitespace", code="empty_question"
            )
        if len(question) > limit:
            raise ValidationFailedError(
                f"'question' is {len(question)} characters; the limit is {limit} "
                "(GAINRAG_API__MAX_QUESTION_CHARS)",
                code="question_too_long",
            )
        top_n = o.top_n if top_n is None else top_n
        if not 1 <= top_n <= o.max_top_n:
            raise ValidationFailedError(
                f"'top_n' must be between 1 and {o.max_top_n}, got {top_n}",
                code="top_n_out_of_range",
            )
        try:
            async with asyncio.timeout(o.timeout_s):
                return await self._answer(question.strip(), top_n)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"no answer within {o.timeout_s:g} s (GAINRAG_PIPELINE__TIMEOUT_S)"
            ) from exc

    async def _answer(self, question: str, top_n: int) -> AnswerResult:
        o = self.options
        timings = dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()

        async def no_retrieval() -> list[Retrieved]:
            return []

        async def no_pseudo() -> str:
            return ""

        retrieve_aw = (
            self._timed(
                "retrieve", timings, self.c.retriever.retrieve(question, self.settings.retrieval.k)
            )
            if o.retrieve and self.c.retriever is not None
            else no_retrieval()
        )
        pseudo_aw = (
            self._timed("pseudo", timings, self._pseudo(question))
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

        if o.select and candidates and self.c.selector is not None:
            scores = await self._timed(
                "select",
                timings,
                self.c.selector.score(question, [s.passage for s in candidates]),
            )
            if not all(math.isfinite(x) for x in scores):
                # e.g. fp16 overflow in a cross-encoder: ranking on NaN would be silently wrong
                raise UpstreamError("the selector returned non-finite scores", code="select_failed")
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
    """Load the models the settings ask for (once, at start-up)."""
    import torch

    from gainrag.models import prepare_llm
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.selector.cross_encoder import CrossEncoderSelector
    from gainrag.selector.relevance import RelevanceSelector

    if settings.llm.threads > 0:
        torch.set_num_threads(settings.llm.threads)
    o, r, s, llm = settings.pipeline, settings.retrieval, settings.selector, settings.llm

    if llm.backend != "transformers":  # pragma: no cover - guarded by the Literal type
        raise ConfigurationError(f"unknown LLM backend {llm.backend!r}")
    generator = _build_generator(settings, prepare_llm(llm.model, llm.models_dir))

    kind = s.kind
    if kind == "auto":
        kind = "cross-encoder" if s.checkpoint is not None else "relevance"
    need_encoder = o.retrieve or (o.select and kind == "relevance")
    encoder = BiEncoder.from_settings(r) if need_encoder else None
    retriever = (
        LocalRetriever.from_settings(r, encoder) if encoder is not None and o.retrieve else None
    )

    selector: Selector | None = None
    if o.select:
        if kind == "cross-encoder":
            if s.checkpoint is None:
                raise ConfigurationError(
                    "selector kind 'cross-encoder' needs GAINRAG_SELECTOR__CHECKPOINT"
                )
            if not (s.checkpoint / "config.json").is_file():
                raise ConfigurationError(
                    f"no selector checkpoint at {s.checkpoint} (GAINRAG_SELECTOR__CHECKPOINT); "
                    "train one with `gainrag train selector` or set "
                    "GAINRAG_SELECTOR__KIND=relevance for the untrained fallback"
                )
            selector = CrossEncoderSelector(
                s.checkpoint,
                max_length=s.max_length,
                batch_size=s.batch_size,
                max_batch_pairs=s.max_batch_pairs,
                max_wait_s=s.max_wait_ms / 1000.0,
                max_queue=s.max_queue,
            )
        else:
            assert encoder is not None
            index = retriever.index if retriever is not None else None
            selector = RelevanceSelector(encoder, index, max_queue=s.max_queue)
    return Components(retriever=retriever, selector=selector, generator=generator)


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
