"""Bi-encoder (all-MiniLM-L6-v2 by default): mean pooling over tokens, L2-normalised."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from gainrag.config import RetrievalSettings
from gainrag.hardware import linear_shapes, resolve_dtype
from gainrag.weights import resolve_encoder


class BiEncoder:
    """Encode texts into unit vectors; inner product is then cosine similarity."""

    def __init__(
        self,
        path: Path,
        *,
        max_length: int = 256,
        name: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        self.name = name or path.name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        # fp32 by default, and always for building an index (build_index checks): the index
        # vectors must not depend on the machine that encoded them. Query encoding at serve time
        # may run in bf16/fp16 (from_settings): a query vector only ranks, it is not stored.
        # auto measures a batch of short queries and one of 64 passage-length texts.
        shapes = linear_shapes(model.config, [16, 2048])
        self.dtype = resolve_dtype("bi-encoder", dtype, self.device, shapes)
        self.model = model.to(self.dtype.torch_dtype).to(self.device).eval()
        self.version = f"{self.name}-{self.dtype.dtype}"
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        # The retriever and the cosine selector call one encoder from their own threads; the
        # fast tokenizer's padding state is not thread-safe, so encodes take turns.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, r: RetrievalSettings, *, dtype: str | None = None) -> BiEncoder:
        """The configured encoder (bundled name or local directory) in ``r.dtype`` unless
        ``dtype`` is given (index building passes float32)."""
        return cls(
            resolve_encoder(r.encoder),
            max_length=r.max_length,
            name=r.encoder,
            dtype=dtype or r.dtype,
        )

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Return float32 unit vectors, shape (len(texts), dim), in input order."""
        with self._lock:
            return self._encode(texts, batch_size, progress)

    def _encode(
        self, texts: Sequence[str], batch_size: int, progress: Callable[[int], None] | None
    ) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding (wasted compute) small within each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            # pool in fp32: a bf16 sum over tokens would round at every addition
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
            if progress is not None:
                progress(len(idx))
        return out
