"""FAISS inner-product index over normalised passage vectors, with a manifest.

An index directory holds ``index.faiss``, ``passages.jsonl`` (id, title, text in index order)
and ``manifest.json`` (encoder, corpus hash, count, index version). The version string goes into
cache keys and API responses so that an answer can always be traced to the index that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from gainrag.errors import ConfigurationError
from gainrag.retrieval.encoder import BiEncoder
from gainrag.types import Passage, Retrieved
from gainrag.util import file_sha256

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


def iter_corpus(path: Path) -> Iterator[Passage]:
    """Passages of a JSONL corpus with ``id``, ``title`` and ``text`` fields."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Passage(id=str(row["id"]), title=row.get("title") or "", text=row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigurationError(f"{path}:{lineno}: not a passage row ({exc})") from exc


def build_index(
    corpus: Path, out: Path, encoder: BiEncoder, *, batch_size: int = 64, show_progress: bool = True
) -> dict[str, Any]:
    """Encode every passage and write the index directory atomically; return the manifest."""
    if encoder.dtype.dtype != "float32":
        # index vectors are stored and compared across machines: never machine-dependent
        raise ConfigurationError(
            f"an index is built in float32, not {encoder.dtype.dtype} (BiEncoder dtype='float32')"
        )
    passages = list(iter_corpus(corpus))
    if not passages:
        raise ConfigurationError(f"corpus {corpus} is empty")
    ids = [p.id for p in passages]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"corpus {corpus} has duplicate passage ids")
    started = time.perf_counter()
    with tqdm(
        total=len(passages), desc="encoding passages", unit="psg", disable=not show_progress
    ) as bar:
        vectors = encoder.encode(
            [p.as_candidate_text() for p in passages], batch_size=batch_size, progress=bar.update
        )
    index = faiss.IndexFlatIP(encoder.dim)
    index.add(vectors)
    corpus_sha = file_sha256(corpus)
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "encoder": encoder.name,
        "max_length": encoder.max_length,
        "dim": encoder.dim,
        "metric": "inner_product",
        "normalized": True,
        "index_type": "flat",
        "count": len(passages),
        "corpus": str(corpus),
        "corpus_sha256": corpus_sha,
        "built_seconds": round(time.perf_counter() - started, 2),
    }
    manifest["version"] = hashlib.sha256(
        f"{INDEX_FORMAT}|{encoder.name}|{encoder.max_length}|flat|{corpus_sha}".encode()
    ).hexdigest()[:12]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    faiss.write_index(index, str(tmp / "index.faiss"))
    with (tmp / "passages.jsonl").open("w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    # Swap in one rename so a reader never sees a half-written index.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def read_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The manifest of an index directory, or None if there is no complete index."""
    path = index_dir / "manifest.json"
    if not path.is_file() or not (index_dir / "index.faiss").is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def faiss_gpu_count() -> int:
    """GPUs visible to the installed faiss (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclass
class DenseIndex:
    """A loaded index: FAISS (CPU or GPU), the passages, and the manifest."""

    index: Any
    passages: list[Passage]
    manifest: dict[str, Any]
    vectors: np.ndarray | None  # passage vectors in index order (flat indexes), for reuse
    on_gpu: bool = False

    @property
    def version(self) -> str:
        """Index version (changes with encoder, corpus or index type)."""
        return str(self.manifest["version"])

    @classmethod
    def load(cls, index_dir: Path, *, use_gpu: bool = True) -> DenseIndex:
        """Load an index directory; move it to GPU FAISS when GPUs exist and ``use_gpu``."""
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise ConfigurationError(
                f"no index at {index_dir}; run `gainrag index build` (or `make prepare`)",
                code="index_missing",
            )
        index = faiss.read_index(str(index_dir / "index.faiss"))
        with (index_dir / "passages.jsonl").open(encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f if line.strip()]
        if index.ntotal != len(passages) or len(passages) != manifest["count"]:
            raise ConfigurationError(f"index at {index_dir} is inconsistent; rebuild it")
        vectors = index.reconstruct_n(0, index.ntotal) if manifest["index_type"] == "flat" else None
        on_gpu = False
        if use_gpu and faiss_gpu_count() > 0:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
            on_gpu = True
            log.info("index moved to GPU FAISS")
        return cls(
            index=index, passages=passages, manifest=manifest, vectors=vectors, on_gpu=on_gpu
        )

    def search(self, queries: np.ndarray, k: int) -> list[list[Retrieved]]:
        """Top-k passages per query vector, best first."""
        k = min(k, len(self.passages))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [
            [
                Retrieved(self.passages[int(i)], rank, float(s))
                for rank, (i, s) in enumerate(zip(row_ids, row_scores, strict=True))
                if i >= 0
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def __post_init__(self) -> None:
        self._row = {p.id: i for i, p in enumerate(self.passages)}

    def position(self, passage_id: str) -> int | None:
        """Index row of a passage id, or None if it is not in the index."""
        return self._row.get(passage_id)
