"""Cross-encoder selector: any local HF sequence-classification checkpoint with one logit.

This is where the trained GainRAG selector plugs in (the same checkpoints FlagEmbedding's
``FlagReranker`` loads). Pairs from concurrent requests are batched together by a
:class:`MicroBatcher` on a pair budget; within a batch, pairs are sorted by length so each model
forward pass pads as little as possible.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gainrag.batching import MicroBatcher
from gainrag.types import Passage
from gainrag.util import file_sha256

Pair = tuple[str, str]


def checkpoint_version(path: Path) -> str:
    """Short hash of a checkpoint's file names and contents.

    Contents, not mtimes: the shipped checkpoint must have the same version (and so the same
    answer-cache keys) in every clone; hashing ~45 MB takes ~0.1 s once at start-up.
    """
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()[:12]


class CrossEncoderScorer:
    """Synchronous scoring of (query, passage) pairs; one logit per pair."""

    def __init__(
        self, path: Path, *, max_length: int = 512, batch_size: int = 32, device: str | None = None
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        if model.config.num_labels != 1:
            raise ValueError(
                f"{path}: a selector needs num_labels=1, got {model.config.num_labels}"
            )
        # fp16 on GPU, fp32 on CPU (whatever the checkpoint's dtype: CPU fp16 is slow)
        model = model.half() if self.device == "cuda" else model.float()
        self.model = model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.inference_mode()
    def score_pairs(self, pairs: list[Pair]) -> list[float]:
        """Raw logits, in input order."""
        scores = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [pairs[i][0] for i in idx],
                [pairs[i][1] for i in idx],
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.view(-1).float().cpu().tolist()
            for i, s in zip(idx, logits, strict=True):
                scores[i] = s
        return scores


class CrossEncoderSelector:
    """The in-process cross-encoder selector with dynamic batching across requests."""

    def __init__(
        self,
        path: Path,
        *,
        max_length: int = 512,
        batch_size: int = 32,
        max_batch_pairs: int = 512,
        max_wait_s: float = 0.002,
        max_queue: int = 64,
    ) -> None:
        self.scorer = CrossEncoderScorer(path, max_length=max_length, batch_size=batch_size)
        self.name = f"cross-encoder:{path.name}"
        self.version = checkpoint_version(path)
        self.batcher: MicroBatcher[list[Pair], list[float]] = MicroBatcher(
            "selector",
            self._run,
            max_batch_cost=max_batch_pairs,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            cost=len,
        )

    def _run(self, requests: list[list[Pair]]) -> list[list[float]]:
        flat = [pair for req in requests for pair in req]
        scores = self.scorer.score_pairs(flat)
        out, pos = [], 0
        for req in requests:
            out.append(scores[pos : pos + len(req)])
            pos += len(req)
        return out

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        """One logit per candidate."""
        if not candidates:
            return []
        return await self.batcher.submit([(question, c.as_candidate_text()) for c in candidates])

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()
