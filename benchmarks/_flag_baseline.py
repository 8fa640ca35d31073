"""FlagEmbedding's ``FlagReranker.compute_score`` as the selector benchmark's baseline.

Runs in its own virtual environment (``.venv-bench``: FlagEmbedding drags in datasets,
sentence-transformers, peft, ...), driven by ``bench_selector.py`` over stdin/stdout so that
the baseline and our worker can take turns without reloading anything:

- argv: ``--model DIR --input WORKLOAD.json [--device cpu|cuda:0]``; the workload is a list of
  ``{"query": str, "documents": [str, ...]}``.
- it loads one reranker per variant, warms each up on the first query, prints one JSON line
  ``{"ready": true, ...}`` (versions, threads, dtypes);
- then for every line ``<variant>`` read from stdin it calls ``compute_score`` once per query,
  sequentially, and prints one JSON line with the wall time; ``quit`` (or EOF) ends it.

Variants: ``default`` is the library as documented, ``FlagReranker(path, use_fp16=False)`` with
its default ``batch_size`` (128) and ``max_length`` (512). With transformers 5 the model loads in
the checkpoint's dtype (the shipped selector is stored fp16) and ``use_fp16=False`` does not
upcast it, so "default" computes in fp16 on CPU. ``fp32`` is the same object with
``model.float()``: the fair same-precision comparison with our worker (fp32 on CPU).
``fp16`` (GPU only) is ``use_fp16=True`` on a CUDA device.

Every model forward pass is counted with a hook (calls, batch rows, padded length), which shows
the library's batch-size probe: the first (longest) batch is run once to see whether it fits in
memory, and then again inside the scoring loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
from FlagEmbedding import FlagReranker


class ForwardCounter:
    """Counts forward calls and the rows x padded length they processed."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0
        self.padded_tokens = 0
        self.shapes: list[list[int]] = []

    def reset(self) -> None:
        self.calls = self.rows = self.padded_tokens = 0
        self.shapes = []

    def hook(self, _module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids") if kwargs else None
        if ids is None and args:
            ids = args[0]
        if ids is None:
            return
        self.calls += 1
        self.rows += int(ids.shape[0])
        self.padded_tokens += int(ids.shape[0] * ids.shape[1])
        self.shapes.append([int(ids.shape[0]), int(ids.shape[1])])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="default,fp32")
    args = ap.parse_args()

    with open(args.input) as f:
        workload: list[dict[str, Any]] = json.load(f)
    variants = [v for v in args.variants.split(",") if v]
    rerankers: dict[str, Any] = {}
    counters: dict[str, ForwardCounter] = {}
    first_scores: dict[str, list[float]] = {}
    for v in variants:
        r = FlagReranker(args.model, use_fp16=(v == "fp16"), devices=[args.device])
        if v == "fp32":
            r.model.float()
        c = ForwardCounter()
        r.model.register_forward_pre_hook(c.hook, with_kwargs=True)
        rerankers[v], counters[v] = r, c
        first = workload[0]
        warm = r.compute_score([[first["query"], d] for d in first["documents"]])  # warm-up
        _sync(args.device)
        c.reset()
        first_scores[v] = [float(x) for x in warm]

    import FlagEmbedding
    import transformers

    info = {
        "ready": True,
        "flagembedding": getattr(FlagEmbedding, "__version__", "1.4.2"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "device": args.device,
        "variants": {
            v: {
                "dtype": str(next(r.model.parameters()).dtype),
                "batch_size": r.batch_size,
                "max_length": r.max_length,
                "scores_first_query": first_scores[v],
            }
            for v, r in rerankers.items()
        },
    }
    print(json.dumps(info), flush=True)

    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("", "quit"):
            break
        if cmd not in rerankers:
            print(json.dumps({"error": f"unknown variant {cmd!r}"}), flush=True)
            continue
        r, c = rerankers[cmd], counters[cmd]
        c.reset()
        per_query: list[float] = []
        started = time.perf_counter()
        for item in workload:
            t = time.perf_counter()
            r.compute_score([[item["query"], d] for d in item["documents"]])
            _sync(args.device)
            per_query.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        pairs = sum(len(item["documents"]) for item in workload)
        print(
            json.dumps(
                {
                    "variant": cmd,
                    "wall_s": wall,
                    "pairs": pairs,
                    "per_query_s": per_query,
                    "forward_calls": c.calls,
                    "forward_rows": c.rows,
                    "forward_padded_tokens": c.padded_tokens,
                    "shapes": c.shapes,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
