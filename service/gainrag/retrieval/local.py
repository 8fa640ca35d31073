"""In-process retriever: concurrent questions share one encoder pass and one FAISS search."""

from __future__ import annotations

import threading

import numpy as np

from gainrag.batching import MicroBatcher
from gainrag.config import RetrievalSettings
from gainrag.errors import ConfigurationError
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import Fusion, PassageIndex
from gainrag.types import Retrieved


class LocalRetriever:
    """Bi-encoder + FAISS in this process."""

    def __init__(
        self,
        encoder: BiEncoder,
        index: PassageIndex,
        *,
        fusion: Fusion | None = None,
        max_batch: int = 64,
        max_queue: int = 256,
    ) -> None:
        self.encoder = encoder
        self._check(index)
        if fusion is not None and index.lexical is None:
            raise ConfigurationError("hybrid retrieval needs the index loaded with BM25")
        self.index = index
        self.fusion = fusion
        # encoder.version carries the query dtype and the fusion changes the list: both rank,
        # so both are in the name that goes into cache keys
        # (dense keeps its name of before hybrid retrieval existed: its cached answers stay valid)
        mode = "" if fusion is None else f":hybrid-{_fusion_tag(fusion)}"
        self.name = f"faiss-{'gpu' if index.on_gpu else 'cpu'}:{encoder.version}{mode}"
        self.version = index.version
        # One writer at a time (documents API, index reload); searches do not take it.
        self.write_lock = threading.Lock()
        self.batcher: MicroBatcher[tuple[str, int], list[Retrieved]] = MicroBatcher(
            "retriever",
            self._run,
            max_batch_cost=max_batch,
            max_wait_s=0.001,
            max_queue=max_queue,
        )

    def _check(self, index: PassageIndex) -> None:
        m, e = index.manifest, self.encoder
        built = (m["encoder"], m["dim"], m.get("max_length"))
        if built != (e.name, e.dim, e.max_length):
            raise ConfigurationError(
                f"index was built with encoder {built[0]} (dim {built[1]}, max_length {built[2]}), "
                f"not {e.name} (dim {e.dim}, max_length {e.max_length}); "
                "rebuild it with `gainrag index build --force`",
                code="index_mismatch",
            )

    def reload(self, r: RetrievalSettings) -> tuple[PassageIndex, PassageIndex]:
        """Load the index of ``r``, serve it, close the old one; returns (old, new). All under
        the writer lock, in the caller's thread (not the event loop's: it takes seconds): no
        document write lands in the old index between the load and the swap, and the old one
        has let go of its files (its writer lock) before the next write."""
        with self.write_lock:
            new = load_index(r)
            old = self._swap(new)
            old.close()
        return old, new

    def swap_index(self, index: PassageIndex) -> PassageIndex:
        """Serve ``index`` from now on; return the previous one.

        One attribute assignment, so the switch is atomic: a batch already searching keeps the
        index it started with (``_run`` reads it once), the next batch uses the new one.
        """
        with self.write_lock:  # not in the middle of a document write to the old index
            return self._swap(index)

    def _swap(self, index: PassageIndex) -> PassageIndex:
        self._check(index)
        if self.fusion is not None and index.lexical is None:
            raise ConfigurationError("hybrid retrieval needs the index loaded with BM25")
        old, self.index = self.index, index
        self.version = index.version
        return old

    @classmethod
    def from_settings(cls, r: RetrievalSettings, encoder: BiEncoder) -> LocalRetriever:
        """Load the configured index for ``encoder`` (GPU FAISS when available and allowed;
        BM25 too in hybrid mode)."""
        index = load_index(r)
        return cls(encoder, index, fusion=fusion_of(r))

    def search_many(self, questions: list[str], k: int) -> list[list[Retrieved]]:
        """Synchronous batched search (one encode, one FAISS call)."""
        index = self.index  # read once: a hot swap during this batch does not mix indexes
        vecs: np.ndarray = self.encoder.encode(questions)
        return index.search(vecs, k, texts=questions, fusion=self.fusion)

    def _run(self, items: list[tuple[str, int]]) -> list[list[Retrieved]]:
        if self.fusion is not None and max(k for _, k in items) > self.fusion.depth:
            # a fused list depends on the depth of its input lists (min-max over them): each
            # request is fused at its own depth, not at its batch's largest k
            return [self.search_many([q], k)[0] for q, k in items]
        kmax = max(k for _, k in items)
        results = self.search_many([q for q, _ in items], kmax)
        return [r[:k] for r, (_, k) in zip(results, items, strict=True)]

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        """Top-k passages for one question, best first."""
        return await self.batcher.submit((question, k))

    async def close(self) -> None:
        """Stop the batcher thread and close the index (writing its FAISS file if it lags)."""
        await self.batcher.close()
        with self.write_lock:
            self.index.close()


def fusion_of(r: RetrievalSettings) -> Fusion | None:
    """The fusion of hybrid settings (None: dense only)."""
    if r.mode == "dense":
        return None
    return Fusion(
        method=r.fusion,
        rrf_c=r.rrf_c,
        weight=r.lexical_weight,
        depth=r.fusion_depth,
        score=r.hybrid_score,
    )


def load_index(r: RetrievalSettings) -> PassageIndex:
    """The configured index directory, with BM25 when hybrid retrieval needs it."""
    return PassageIndex.load(r.index_dir, use_gpu=r.use_gpu == "auto", lexical=r.mode == "hybrid")


def _fusion_tag(f: Fusion) -> str:
    part = f"c{f.rrf_c}" if f.method == "rrf" else f"w{f.weight:g}"
    return f"{f.method}-{part}-d{f.depth}" + ("-dense-score" if f.score == "dense" else "")
