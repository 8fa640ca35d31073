"""Bi-encoder (all-MiniLM-L6-v2 by default): mean pooling over tokens, L2-normalised."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from gainrag.config import RetrievalSettings
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
    ) -> None:
        self.name = name or path.name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # fp32 everywhere: the index vectors must not depend on the device that encoded them.
        self.model = AutoModel.from_pretrained(path).float().to(self.device).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        # The retriever and the cosine selector call one encoder from their own threads; the
        # fast tokenizer's padding state is not thread-safe, so encodes take turns.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, r: RetrievalSettings) -> BiEncoder:
        """The configured encoder (bundled name or local directory)."""
        return cls(resolve_encoder(r.encoder), max_length=r.max_length, name=r.encoder)

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
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
            if progress is not None:
                progress(len(idx))
        return out
