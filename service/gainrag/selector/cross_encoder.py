"""Cross-encoder selector: any local HF sequence-classification checkpoint with one logit.

This is where the trained GainRAG selector plugs in (the same checkpoints FlagEmbedding's
``FlagReranker`` loads). Pairs from concurrent requests are batched together by a
:class:`MicroBatcher` on a pair budget; within a batch, pairs are sorted by length so each model
forward pass pads as little as possible.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gainrag.batching import MicroBatcher
from gainrag.errors import ConfigurationError
from gainrag.hardware import linear_shapes, resolve_dtype
from gainrag.selector import openvino_runtime as ovr
from gainrag.selector.openvino_runtime import OpenVINOModel
from gainrag.types import Passage
from gainrag.util import file_sha256

Pair = tuple[str, str]
log = logging.getLogger(__name__)


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


def _fp32_head(model: torch.nn.Module) -> None:
    """Run the pooler and classifier in fp32 on a bf16 encoder.

    A bf16 logit has 8 significant bits (steps of 1/16 at |logit| ~ 8): candidates would tie
    and the ranking would depend on rounding. The head is two small matmuls on one token.
    """

    def upcast(
        _module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[tuple[object, ...], dict[str, object]]:
        def up(v: object) -> object:
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("pooler", "classifier", "score"):
            module.float()
            module.register_forward_pre_hook(upcast, with_kwargs=True)


class CrossEncoderScorer:
    """Synchronous scoring of (query, passage) pairs; one logit per pair.

    ``runtime``: ``torch``, ``openvino`` (CPU only) or ``auto`` (OpenVINO where it is installed
    and passes this machine's check, :mod:`gainrag.selector.openvino_runtime`; else torch).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_length: int = 512,
        batch_size: int = 0,
        device: str | None = None,
        dtype: str = "auto",
        runtime: str = "torch",
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        if model.config.num_labels != 1:
            raise ValueError(
                f"{path}: a selector needs num_labels=1, got {model.config.num_labels}"
            )
        self.max_length = max_length
        # Measured on 2 CPU cores (16 x 101 passages): 16 pairs per pass beat 8, 32 and 64.
        self.batch_size = batch_size or (128 if self.device == "cuda" else 16)
        # Whatever the checkpoint's dtype (the shipped one is fp16, slow on CPU): auto measures
        # a batch of ~128-token pairs, the selector's typical pass.
        shapes = linear_shapes(model.config, [self.batch_size * 128])
        self.dtype = resolve_dtype("selector", dtype, self.device, shapes)
        self.checkpoint_version = checkpoint_version(path)
        model = model.to(self.dtype.torch_dtype)
        if self.dtype.dtype == "bfloat16":
            _fp32_head(model)
        self.model: torch.nn.Module | None = model.to(self.device).eval()
        self.openvino: OpenVINOModel | None = None
        self.runtime_reason = "configured" if runtime == "torch" else f"{self.device}: torch"
        if runtime != "torch" and self.device == "cpu":
            self._try_openvino(path, runtime, dtype)

    @property
    def variant(self) -> str:
        """What computes the scores, for versions and logs: ``bfloat16``, ``openvino-bf16``."""
        if self.openvino is not None:
            return f"openvino-{self.openvino.precision}"
        return self.dtype.dtype

    def _try_openvino(self, path: Path, runtime: str, dtype: str) -> None:
        precision = ovr.precision_for(dtype)
        if precision is None or ovr.available() is None:
            why = (
                f"no OpenVINO precision for dtype {dtype}"
                if precision is None
                else "not installed (`pip install openvino`, in `make install`)"
            )
            if runtime == "openvino":
                raise ConfigurationError(f"GAINRAG_SELECTOR__RUNTIME=openvino: OpenVINO {why}")
            self.runtime_reason = f"torch: OpenVINO {why}"
            log.info("selector runtime: %s", self.runtime_reason)
            return
        threads = torch.get_num_threads()
        candidate = ovr.OpenVINOModel(path, self.checkpoint_version, precision, threads)
        if runtime == "auto":
            assert self.model is not None
            served = self.model

            def run() -> ovr.RuntimeCheck:
                probe = ovr.load_probe(ovr.probe_path(path))
                key = ovr.reference_key(self.checkpoint_version, self.max_length)
                ref = probe.references.get(key) or self._fp32_logits(path, probe.questions)
                return ovr.compare(
                    probe.questions,
                    ref,
                    lambda pairs: self._score(pairs, candidate.logits, tensors="np"),
                    lambda pairs: self._score(pairs, served.forward),
                    precision,
                    self.dtype.dtype,
                )

            try:
                check = ovr.cached_check(
                    ovr.check_key(self.checkpoint_version, precision, threads, self.max_length),
                    run,
                )
            except (OSError, ValueError) as exc:
                # auto must never cost the start: without its check, torch serves
                self.runtime_reason = f"torch: the OpenVINO check could not run ({exc})"
                log.warning("selector runtime: %s", self.runtime_reason)
                return
            if not check.passed:
                self.runtime_reason = f"torch: {check.describe()}"
                log.info("selector runtime: %s", self.runtime_reason)
                return
            self.runtime_reason = check.describe()
        self.openvino, self.model = candidate, None  # the torch weights are not needed now
        log.info("selector runtime: openvino %s (%s)", precision, self.runtime_reason)

    def _fp32_logits(self, path: Path, questions: list[tuple[str, list[str]]]) -> list[list[float]]:
        """torch float32's logits for the check, where the probe has none for this checkpoint and
        max length (only then is a float32 copy loaded)."""
        fp32 = AutoModelForSequenceClassification.from_pretrained(path).float().eval()
        return [self._score([(q, d) for d in docs], fp32.forward) for q, docs in questions]

    def score_pairs(self, pairs: list[Pair]) -> list[float]:
        """Raw logits, in input order."""
        return self.score_pairs_counted(pairs)[0]

    def score_pairs_counted(self, pairs: list[Pair]) -> tuple[list[float], list[int]]:
        """Raw logits and the number of (truncated) tokens of each pair, in input order."""
        if self.openvino is not None:
            return self._score_counted(pairs, self.openvino.logits, tensors="np")
        assert self.model is not None
        return self._score_counted(pairs, self.model.forward)

    def _score(
        self, pairs: list[Pair], forward: Callable[..., Any], tensors: str = "pt"
    ) -> list[float]:
        return self._score_counted(pairs, forward, tensors)[0]

    @torch.inference_mode()
    def _score_counted(
        self, pairs: list[Pair], forward: Callable[..., Any], tensors: str = "pt"
    ) -> tuple[list[float], list[int]]:
        if not pairs:
            return [], []
        # Tokenise once, unpadded, then sort by *token* length and pad each chunk to its own
        # longest pair: sorting by characters left ~30% padding on 16 x 101 real passages.
        enc = self.tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            truncation="only_second",
            max_length=self.max_length,
        )
        tokens = [len(ids) for ids in enc["input_ids"]]
        scores = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=tokens.__getitem__)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer.pad(
                {key: [enc[key][i] for i in idx] for key in enc}, return_tensors=tensors
            )
            if tensors == "pt":
                out = forward(**batch.to(self.device))
                logits = out.logits.view(-1).float().cpu().tolist()
            else:
                logits = forward(dict(batch))
            for i, s in zip(idx, logits, strict=True):
                scores[i] = s
        return scores, tokens


class CrossEncoderSelector:
    """The in-process cross-encoder selector with dynamic batching across requests."""

    def __init__(
        self,
        path: Path,
        *,
        max_length: int = 512,
        batch_size: int = 0,
        max_batch_pairs: int = 512,
        max_wait_s: float = 0.002,
        max_queue: int = 64,
        dtype: str = "auto",
        runtime: str = "torch",
    ) -> None:
        self.scorer = CrossEncoderScorer(
            path, max_length=max_length, batch_size=batch_size, dtype=dtype, runtime=runtime
        )
        self.name = f"cross-encoder:{path.name}"
        # The dtype and runtime change the scores (bf16 ~3 digits), so they are in cache keys;
        # the max length too, where it is not the default (it cuts long passages).
        length = "" if max_length == 512 else f"-len{max_length}"
        self.version = f"{self.scorer.checkpoint_version}-{self.scorer.variant}{length}"
        self.batcher: MicroBatcher[list[Pair], tuple[list[float], int]] = MicroBatcher(
            "selector",
            self._run,
            max_batch_cost=max_batch_pairs,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            cost=len,
        )

    def _run(self, requests: list[list[Pair]]) -> list[tuple[list[float], int]]:
        # All pairs of all requests in the batch are sorted by length together (score_pairs),
        # so short documents of one request pad with short documents of another.
        flat = [pair for req in requests for pair in req]
        scores, tokens = self.scorer.score_pairs_counted(flat)
        out, pos = [], 0
        for req in requests:
            end = pos + len(req)
            out.append((scores[pos:end], sum(tokens[pos:end])))
            pos = end
        return out

    async def score_texts(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """One logit per document, in order, and the tokens scored (the /rerank worker's view)."""
        if not documents:
            return [], 0
        return await self.batcher.submit([(query, d) for d in documents])

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        """One logit per candidate."""
        scores, _ = await self.score_texts(question, [c.as_candidate_text() for c in candidates])
        return scores

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()
