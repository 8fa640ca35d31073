"""In-process retriever: concurrent questions share one encoder pass and one FAISS search."""

from __future__ import annotations

import numpy as np

from gainrag.batching import MicroBatcher
from gainrag.config import RetrievalSettings
from gainrag.errors import ConfigurationError
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import DenseIndex
from gainrag.types import Retrieved


class LocalRetriever:
    """Bi-encoder + FAISS in this process."""

    def __init__(
        self, encoder: BiEncoder, index: DenseIndex, *, max_batch: int = 64, max_queue: int = 256
    ) -> None:
        self.encoder = encoder
        self._check(index)
        self.index = index
        # encoder.version carries the query dtype: it changes rankings, so it is in cache keys
        self.name = f"faiss-{'gpu' if index.on_gpu else 'cpu'}:{encoder.version}"
        self.version = index.version
        self.batcher: MicroBatcher[tuple[str, int], list[Retrieved]] = MicroBatcher(
            "retriever",
            self._run,
            max_batch_cost=max_batch,
            max_wait_s=0.001,
            max_queue=max_queue,
        )

    def _check(self, index: DenseIndex) -> None:
        m, e = index.manifest, self.encoder
        built = (m["encoder"], m["dim"], m.get("max_length"))
        if built != (e.name, e.dim, e.max_length):
            raise ConfigurationError(
                f"index was built with encoder {built[0]} (dim {built[1]}, max_length {built[2]}), "
                f"not {e.name} (dim {e.dim}, max_length {e.max_length}); "
                "rebuild it with `gainrag index build --force`",
                code="index_mismatch",
            )

    def swap_index(self, index: DenseIndex) -> DenseIndex:
        """Serve ``index`` from now on; return the previous one.

        One attribute assignment, so the switch is atomic: a batch already searching keeps the
        index it started with (``_run`` reads it once), the next batch uses the new one.
        """
        self._check(index)
        old, self.index = self.index, index
        self.version = index.version
        return old

    @classmethod
    def from_settings(cls, r: RetrievalSettings, encoder: BiEncoder) -> LocalRetriever:
        """Load the configured index for ``encoder`` (GPU FAISS when available and allowed)."""
        return cls(encoder, DenseIndex.load(r.index_dir, use_gpu=r.use_gpu == "auto"))

    def search_many(self, questions: list[str], k: int) -> list[list[Retrieved]]:
        """Synchronous batched search (one encode, one FAISS call)."""
        index = self.index  # read once: a hot swap during this batch does not mix indexes
        vecs: np.ndarray = self.encoder.encode(questions)
        return index.search(vecs, k)

    def _run(self, items: list[tuple[str, int]]) -> list[list[Retrieved]]:
        kmax = max(k for _, k in items)
        results = self.search_many([q for q, _ in items], kmax)
        return [r[:k] for r, (_, k) in zip(results, items, strict=True)]

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        """Top-k passages for one question, best first."""
        return await self.batcher.submit((question, k))

    async def close(self) -> None:
        """Stop the batcher thread."""
        await self.batcher.close()
