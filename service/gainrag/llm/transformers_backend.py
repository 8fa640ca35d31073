"""In-process transformers backend with dynamic batching of concurrent prompts.

Concurrent prompts with the same generation budget are left-padded into one ``generate`` call:
on a 2-core CPU a batch of 8 SmolLM2 prompts yields ~2.5x the tokens/s of one at a time.

The user message (question, passages) is tokenised as plain text: a ``<|im_start|>system`` typed
by a user stays those characters and never becomes the template's control token. Only the chat
template around the message is tokenised with its special tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gainrag.batching import MicroBatcher
from gainrag.errors import ValidationFailedError
from gainrag.hardware import linear_shapes, resolve_dtype
from gainrag.llm.scoring import TransformersTeacherForcedScorer


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
    ) -> None:
        """``dtype_rows``: the matmul row counts ``dtype="auto"`` is measured at (default: one
        decode step at batch 1 and at ``max_batch_size``; a teacher-forced scorer runs whole
        packed sequences, thousands of rows, where bf16 pays off even when decoding does not)."""
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
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        meta = path / "gainrag_model.json"
        self.name = json.loads(meta.read_text())["name"] if meta.is_file() else path.name
        self.version = f"{self.name}-{self.dtype.dtype}"  # the resolved dtype, never "auto"
        self.max_input_tokens = max_input_tokens
        self._prefix, self._suffix = self._template_ids()
        # A second tokenizer for counting on the caller's thread (before admission): the one
        # above belongs to the batcher's worker thread.
        self._counter = AutoTokenizer.from_pretrained(path)
        self._counter_lock = threading.Lock()
        # The fast tokenizer is not safe to use from two threads (its padding state is shared):
        # all tokenisation happens on the batcher's one worker thread.
        self.batcher: MicroBatcher[tuple[str, int], str] = MicroBatcher(
            "generator",
            self._run,
            max_batch_cost=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            key=lambda item: item[1],  # one batch = one max_new_tokens
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
    def _generate_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        if not prompts:
            return []
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(
            self.device
        )
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _run(self, items: list[tuple[str, int]]) -> list[str | BaseException]:
        ids = [self.encode(m) for m, _ in items]
        lengths = [len(x) for x in ids]
        ok = [i for i, n in enumerate(lengths) if n <= self.max_input_tokens]
        replies = dict(zip(ok, self._generate_ids([ids[i] for i in ok], items[0][1]), strict=True))
        return [replies[i] if i in replies else self._too_long(n) for i, n in enumerate(lengths)]

    def _too_long(self, n: int) -> ValidationFailedError:
        return ValidationFailedError(
            f"prompt is {n} tokens, over the {self.max_input_tokens}-token limit "
            "(GAINRAG_LLM__MAX_INPUT_TOKENS); ask for fewer passages",
            code="prompt_too_long",
        )

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """Reply to one user message (batched with concurrent calls)."""
        return await self.batcher.submit((message, max_new_tokens))

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()

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
