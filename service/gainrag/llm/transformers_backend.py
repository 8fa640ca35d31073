"""In-process transformers backend with dynamic batching of concurrent prompts.

Concurrent prompts with the same generation budget are left-padded into one ``generate`` call:
on a 2-core CPU a batch of 8 SmolLM2 prompts yields ~2.5x the tokens/s of one at a time.

The user message (question, passages) is tokenised as plain text: a ``<|im_start|>system`` typed
by a user stays those characters and never becomes the template's control token. Only the chat
template around the message is tokenised with its special tokens.

Streaming (:meth:`TransformersGenerator.stream`) shares the batches: every batch decodes with a
per-row streamer that turns each step's token into a text delta for that row's consumer, and a
stopping criterion that finishes a row whose consumer went away (and, once every row is finished,
the whole ``generate`` call). ``gainrag_llm_generated_tokens_total`` counts the decoded tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gainrag import telemetry
from gainrag.batching import MicroBatcher
from gainrag.errors import ValidationFailedError
from gainrag.hardware import linear_shapes, resolve_dtype
from gainrag.llm.lora import LoraAdapter, LoraSpec, merge_adapter, version_suffix
from gainrag.llm.scoring import TransformersTeacherForcedScorer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """One prompt in the batcher: its budget, whether its caller left, and where deltas go."""

    message: str
    max_new_tokens: int
    # Set from the event loop, read by the model thread each step (a plain bool is atomic).
    cancelled: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # set for streaming jobs
    deltas: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    # Text already delivered, kept across reruns of a failed batch (bisection) so a rerun
    # delivers only what is new.
    emitted: str = ""

    def deliver(self, delta: str) -> None:
        """Hand a delta to the consumer (called from the model thread)."""
        if self.loop is not None and delta:
            self.emitted += delta
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, delta)


def _stable(text: str) -> str:
    """What of a partial decode may be sent: stripped like the final reply, and without a
    trailing U+FFFD (a multi-byte character whose remaining bytes are in the next token)."""
    return text.strip().rstrip("\ufffd")


class _RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens (one per row), counts them and streams the text of
    rows that have a consumer. Runs on the model thread inside ``generate``."""

    def __init__(self, tokenizer: Any, jobs: list[_Job | None], eos: set[int]) -> None:
        self.tokenizer = tokenizer
        self.jobs = jobs
        self.eos = eos
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.live = [True] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        tokens = value.view(-1).tolist()
        telemetry.LLM_TOKENS.inc(sum(self.live))
        for i, (token, job) in enumerate(zip(tokens, self.jobs, strict=True)):
            if not self.live[i]:
                continue
            if token in self.eos or (job is not None and job.cancelled):
                self.live[i] = False
            if job is None or job.loop is None:
                continue
            self.ids[i].append(token)
            text = _stable(self.tokenizer.decode(self.ids[i], skip_special_tokens=True))
            if len(text) > len(job.emitted) and text.startswith(job.emitted):
                job.deliver(text[len(job.emitted) :])

    def end(self) -> None:
        return None

    def finish(self, replies: list[str]) -> None:
        """Send what is left of each streamed reply (trailing text held back until the end)."""
        for job, reply in zip(self.jobs, replies, strict=True):
            if job is None or job.loop is None or job.cancelled:
                continue
            if reply.startswith(job.emitted):
                job.deliver(reply[len(job.emitted) :])
            else:  # a partial decode was not a prefix of the full one (never seen; logged)
                log.warning("streamed text diverged from the final reply; the rest is dropped")


class _CallerLeft(StoppingCriteria):
    """Finishes the rows whose caller went away; ``generate`` stops when no row is left."""

    def __init__(self, jobs: list[_Job | None]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        flags = [j is not None and j.cancelled for j in self.jobs]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class TransformersGenerator:
    """Greedy chat generation with a local HF causal LM."""

    def __init__(
        self,
        path: Path,
        *,
        dtype: str = "auto",
        max_input_tokens: int = 4096,
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        dtype_rows: Sequence[int] | None = None,
        lora_adapter: Path | None = None,
    ) -> None:
        """``dtype_rows``: the matmul row counts ``dtype="auto"`` is measured at (default: one
        decode step at batch 1 and at ``max_batch_size``; a teacher-forced scorer runs whole
        packed sequences, thousands of rows, where bf16 pays off even when decoding does not).
        ``lora_adapter``: a peft LoRA adapter merged into the weights (see ``llm/lora.py``)."""
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only batching pads on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # auto measures a decode step at batch 1 and at a full batch: bf16 must win at both (on
        # some CPUs its one-row matmul is far slower than fp32, and batch 1 is the idle case).
        rows = list(dtype_rows) if dtype_rows else [1, max_batch_size]
        shapes = linear_shapes(AutoConfig.from_pretrained(path), rows)
        self.dtype = resolve_dtype("llm", dtype, self.device, shapes)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype.torch_dtype)
        meta = path / "gainrag_model.json"
        self.name = json.loads(meta.read_text())["name"] if meta.is_file() else path.name
        self.version = f"{self.name}-{self.dtype.dtype}"  # the resolved dtype, never "auto"
        if lora_adapter is not None:
            model = merge_adapter(model, lora_adapter)
            # the adapter changes every answer: it is part of the version (cache keys)
            self.version += version_suffix(lora_adapter)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.max_input_tokens = max_input_tokens
        self._prefix, self._suffix = self._template_ids()
        # A second tokenizer for counting on the caller's thread (before admission): the one
        # above belongs to the batcher's worker thread.
        self._counter = AutoTokenizer.from_pretrained(path)
        self._counter_lock = threading.Lock()
        # The fast tokenizer is not safe to use from two threads (its padding state is shared):
        # all tokenisation happens on the batcher's one worker thread.
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.batcher: MicroBatcher[_Job, str] = MicroBatcher(
            "generator",
            self._run,
            max_batch_cost=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            key=lambda job: job.max_new_tokens,  # one batch = one max_new_tokens
        )

    def render(self, message: str) -> str:
        """The model's chat template applied to one user message, ready for generation."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return str(text)

    def _template_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the chat template before and after the user message."""
        marker = "\ue000gainrag-message\ue000"  # private-use characters: never in a template
        before, found, after = self.render(marker).partition(marker)
        if not found:
            raise ValueError("the chat template does not include the user message verbatim")
        ids = self.tokenizer([before, after], add_special_tokens=False)["input_ids"]
        return list(ids[0]), list(ids[1])

    def encode(self, message: str, tokenizer: Any = None) -> list[int]:
        """Prompt ids for one user message: the template's special tokens, the message as text.

        ``split_special_tokens`` makes special-token strings inside the message plain text.
        """
        tok = tokenizer or self.tokenizer
        body = tok(message, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [*self._prefix, *body, *self._suffix]

    def prompt_tokens(self, message: str) -> int:
        """Exact prompt length of one user message; safe to call from any thread."""
        with self._counter_lock:
            return len(self.encode(message, self._counter))

    def generate_batch(self, messages: list[str], max_new_tokens: int) -> list[str]:
        """Greedy replies to several user messages at once, in order (blocking)."""
        return self._generate_ids([self.encode(m) for m in messages], max_new_tokens)

    def _generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Replies to already rendered prompts (the benchmarks' entry point)."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self._generate_ids([list(x) for x in ids], max_new_tokens)

    @torch.inference_mode()
    def _generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        jobs: list[_Job | None] | None = None,
    ) -> list[str]:
        if not prompts:
            return []
        jobs = jobs or [None] * len(prompts)
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(
            self.device
        )
        streamer = _RowStreamer(self.tokenizer, jobs, self._eos)
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_CallerLeft(jobs)]),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        replies = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        streamer.finish(replies)
        return replies

    def _run(self, items: list[_Job]) -> list[str | BaseException]:
        ids = [self.encode(job.message) for job in items]
        lengths = [len(x) for x in ids]
        ok = [i for i, n in enumerate(lengths) if n <= self.max_input_tokens]
        generated = self._generate_ids(
            [ids[i] for i in ok], items[0].max_new_tokens, [items[i] for i in ok]
        )
        replies = dict(zip(ok, generated, strict=True))
        return [replies[i] if i in replies else self._too_long(n) for i, n in enumerate(lengths)]

    def _too_long(self, n: int) -> ValidationFailedError:
        return ValidationFailedError(
            f"prompt is {n} tokens, over the {self.max_input_tokens}-token limit "
            "(GAINRAG_LLM__MAX_INPUT_TOKENS); ask for fewer passages",
            code="prompt_too_long",
        )

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """Reply to one user message (batched with concurrent calls)."""
        job = _Job(message, max_new_tokens)
        try:
            return await self.batcher.submit(job)
        finally:  # cancelled (the client left): its row stops decoding at the next step
            job.cancelled = True

    async def stream(self, message: str, *, max_new_tokens: int) -> AsyncIterator[str]:
        """Reply to one user message as text deltas (batched with concurrent calls).

        The deltas concatenate to what :meth:`chat` returns: partial decodes are sent stripped,
        and a trailing partial character or whitespace waits for the next token. Closing the
        iterator early finishes this row of its batch at the next decoding step.
        """
        job = _Job(message, max_new_tokens, loop=asyncio.get_running_loop())
        result = asyncio.ensure_future(self.batcher.submit(job))
        # After the model thread's last delta (both reach the loop through call_soon_threadsafe,
        # the result later): an empty string marks the end.
        result.add_done_callback(lambda _: job.deltas.put_nowait(""))
        try:
            while delta := await job.deltas.get():
                yield delta
            result.result()  # the job's own error (prompt too long, queue full, model failure)
        finally:
            job.cancelled = True
            if not result.done():
                result.cancel()

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()

    def attach_lora(self, spec: LoraSpec) -> LoraAdapter:
        """Inject a trainable LoRA adapter into this model in place (DRO's generator update):
        generation and :meth:`teacher_forced_scorer` then run with it."""
        adapter = LoraAdapter(self.model, spec)
        self.version += "+lora-training"  # answers no longer match the base weights
        return adapter

    def teacher_forced_scorer(self, *, batch_size: int = 8) -> TransformersTeacherForcedScorer:
        """This model and chat template as a ``TeacherForcedScorer`` (same weights, no copy)."""
        return TransformersTeacherForcedScorer(
            self.model, self.tokenizer, self.render, version=self.version, batch_size=batch_size
        )


# Rows of one scoring forward pass that ``dtype="auto"`` measures: a batch of packed sequences
# (prompt with a ~200-word passage plus the gold answers) is a few thousand token rows.
SCORING_ROWS = 2048


def load_teacher_forced_scorer(
    path: Path, *, dtype: str = "auto", batch_size: int = 8
) -> TransformersTeacherForcedScorer:
    """A teacher-forced scorer on the checkpoint at ``path`` with its own dtype choice (scoring
    shapes, not decode shapes), for offline jobs whose generator runs elsewhere."""
    gen = TransformersGenerator(path, dtype=dtype, dtype_rows=[SCORING_ROWS])
    return gen.teacher_forced_scorer(batch_size=batch_size)
