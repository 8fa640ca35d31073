"""The real gateway (``create_app``: middleware, validation, pipeline, serialisation, metrics)
with instant in-process stand-ins for retrieval, selection and generation, to measure what the
gateway itself costs per request. Used by ``bench_gateway.py``; not part of the service.

    python -m benchmarks.gateway_standin --port 8100 [--workers 2]
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

from gainrag.api import create_app
from gainrag.config import Settings
from gainrag.pipeline import Components
from gainrag.types import Passage, Retrieved

K = 100
# Realistic payload: 100 passages of ~100 words, like the real retriever returns.
_TEXT = " ".join(f"word{i}" for i in range(100))
_HITS = [Retrieved(Passage(f"p{i}", f"Title {i}", _TEXT), i, 1.0 - i / 1000) for i in range(K)]


class InstantRetriever:
    """Returns the same k passages at once."""

    name, version = "standin-retriever", "standin"

    async def retrieve(self, question: str, k: int) -> list[Retrieved]:
        return _HITS[:k]

    async def close(self) -> None:
        return None


class InstantSelector:
    """Scores candidates by their position, at once."""

    name, version = "standin-selector", "standin"

    async def score(self, question: str, candidates: list[Passage]) -> list[float]:
        return [float(-i) for i in range(len(candidates))]

    async def close(self) -> None:
        return None


class InstantGenerator:
    """Replies with a fixed text at once ("N/A" would drop the pseudo-passage, so not that)."""

    name, version = "standin-generator", "standin"

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        return "Wilhelm Conrad Röntgen was awarded the first Nobel Prize in Physics in 1901."

    async def close(self) -> None:
        return None


def app_factory() -> FastAPI:
    """The gateway over the stand-ins, with the service's default settings otherwise."""
    settings = Settings()
    comps = Components(InstantRetriever(), InstantSelector(), InstantGenerator())
    return create_app(settings, components=comps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    from gainrag.logs import setup_logging

    setup_logging(Settings().log_level)
    uvicorn.run(
        "benchmarks.gateway_standin:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
