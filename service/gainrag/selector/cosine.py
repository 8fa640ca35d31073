"""The untrained fallback selector: bi-encoder cosine between the question and each candidate.

Used when no cross-encoder checkpoint is configured (``GAINRAG_SELECTOR__KIND=cosine``). Corpus
passages reuse the vectors already stored in the index (the index encodes exactly
``title\\ntext``), so only the question and the pseudo-passage are encoded per request.
"""

from __future__ import annotations

import numpy as np

from gainrag.batching import MicroBatcher
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import PassageIndex
from gainrag.types import Passage


class CosineSelector:
    """Cosine similarity of normalised bi-encoder vectors."""

    def __init__(
        self, encoder: BiEncoder, index: PassageIndex | None = None, *, max_queue: int = 64
    ) -> None:
        self.encoder = encoder
        self.index = index
        # Its former name stays in the public identifiers: name and version are in /ready, in
        # answers and in cache keys, and "relevance" is the batcher label of its metrics.
        self.name = f"relevance:{encoder.name}"
        self.version = f"relevance-{encoder.version}-{encoder.max_length}"
        # Encoding shares the encoder's thread budget; batching several requests' texts is cheap.
        self.batcher: MicroBatcher[list[str], np.ndarray] = MicroBatcher(
            "relevance",
            self._encode,
            max_batch_cost=256,
            max_wait_s=0.001,
            max_queue=max_queue,
            cost=len,
        )

    def _encode(self, requests: list[list[str]]) -> list[np.ndarray]:
        flat = [t for req in requests for t in req]
        vecs = self.encoder.encode(flat) if flat else np.empty((0, self.encoder.dim), np.float32)
        out, pos = [], 0
        for req in requests:
            out.append(vecs[pos : pos + len(req)])
            pos += len(req)
        return out

    def _stored_vector(self, p: Passage) -> np.ndarray | None:
        if self.index is None or p.pseudo:
            return None
        stored = self.index.vectors_of([p.id])
        return None if stored is None else stored[0]

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        """Cosine similarity per candidate."""
        if not candidates:
            return []
        stored = [self._stored_vector(c) for c in candidates]
        missing = [i for i, v in enumerate(stored) if v is None]
        texts = [question] + [candidates[i].as_candidate_text() for i in missing]
        vecs = await self.batcher.submit(texts)
        matrix = np.empty((len(candidates), vecs.shape[1]), dtype=np.float32)
        for i, v in enumerate(stored):
            if v is not None:
                matrix[i] = v
        for j, i in enumerate(missing):
            matrix[i] = vecs[j + 1]
        return [float(x) for x in matrix @ vecs[0]]

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()
