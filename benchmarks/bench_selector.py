"""Selector throughput: pairs/s of the selector worker against FlagEmbedding's FlagReranker.

Workload: ``--queries`` nq_dev questions x (top ``--k`` passages from the shipped index, as
``title\\ntext``, + 1 pseudo-like passage), the same texts for both sides.

- Ours: the real selector worker (``gainrag worker selector``, shipped checkpoint) on a free
  loopback port; all queries are sent at once as concurrent ``POST /rerank`` calls and the wall
  clock until the last answer gives pairs/s. Median over ``--rounds``.
- Baseline: ``FlagReranker(checkpoint, use_fp16=False, devices=[cpu]).compute_score(pairs)``,
  once per query, sequentially, in the separate ``.venv-bench`` (``benchmarks/_flag_baseline.py``),
  with the library's defaults (batch_size 128, max_length 512). Rounds alternate with ours,
  never concurrently.
- FLOP/s: FLOPs of the scoring counted from token counts (useful tokens, and tokens after padding)
  against the measured fp32 matmul peak of this machine at the same torch thread count.

On a machine with CUDA the CPU comparison is kept (worker started with ``CUDA_VISIBLE_DEVICES=``)
and the worker is run again on the GPU (fp16), with the peak measured in fp16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import (
    LOG_DIR,
    QUESTIONS,
    ROOT,
    START_S,
    matmul_peak,
    question_texts,
    rel,
    write_result,
)
from gainrag_harness import Service, gainrag_service

NAME = "selector"
TARGET_RATIO = 1.0
DEFAULT_CHECKPOINT = ROOT / "models/selector/gainrag-minilm-l6"
DEFAULT_BASELINE_PYTHON = ROOT / ".venv-bench/bin/python"

Workload = list[dict[str, Any]]  # [{"query": str, "documents": [str, ...]}]


# --------------------------------------------------------------------------- workload


def build_workload(questions: list[str], k: int) -> Workload:
    """Top-k passages of each question from the shipped index, plus one pseudo-like passage."""
    from gainrag.config import Settings
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.index import PassageIndex, read_manifest

    r = Settings().retrieval
    if read_manifest(r.index_dir) is None:
        raise SystemExit(
            f"no index at {r.index_dir}: run `make prepare` (or `.venv/bin/gainrag index build`)"
        )
    encoder = BiEncoder.from_settings(r)
    index = PassageIndex.load(r.index_dir, use_gpu=False)
    hits = index.search(encoder.encode(questions), k)
    workload: Workload = []
    for q, row in zip(questions, hits, strict=True):
        docs = [h.passage.as_candidate_text() for h in row]
        # Pseudo-like passage: empty title (as the pipeline's pseudo-passage), ~100 words that
        # restate the question and continue with background (here: the top passage's words).
        top_words = row[0].passage.text.split()[:90]
        docs.append(f"\n{q[:1].upper()}{q[1:]}: {' '.join(top_words)}")
        workload.append({"query": q, "documents": docs})
    return workload


# --------------------------------------------------------------------------- FLOPs


class FlopModel:
    """Forward FLOPs of a BERT-style cross-encoder for one sequence of ``L`` tokens.

    ``F(L) = 2 * P_layers * L + 4 * n_layers * d_model * L^2 + 2 * P_head``

    - ``2 * P_layers`` per token: every weight of the encoder layers (attention projections,
      FFN) is one multiply-add per token; embeddings are lookups (no FLOPs);
    - ``4 * n_layers * d_model * L`` per token: ``Q K^T`` and ``softmax(.) V`` are each
      ``2 * L * d_model`` per token and layer (all heads together);
    - ``2 * P_head`` per sequence: pooler + classifier run on the [CLS] token only.

    Softmax, GELU, LayerNorm and biases are left out (a few % at these sizes).
    """

    def __init__(self, checkpoint: Path, max_length: int) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        cfg = AutoConfig.from_pretrained(checkpoint)
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
        self.p_embed = self.p_head = self.p_layers = 0
        for name, p in model.named_parameters():
            if "embeddings" in name:
                self.p_embed += p.numel()
            elif "pooler" in name or "classifier" in name:
                self.p_head += p.numel()
            else:
                self.p_layers += p.numel()
        self.n_layers = int(cfg.num_hidden_layers)
        self.d_model = int(cfg.hidden_size)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.max_length = max_length
        del model

    def seq(self, length: int, rows: int = 1) -> float:
        """FLOPs of ``rows`` sequences of ``length`` tokens (padded positions count in full)."""
        per = (
            2.0 * self.p_layers * length
            + 4.0 * self.n_layers * self.d_model * length * length
            + 2.0 * self.p_head
        )
        return per * rows

    def lengths(self, query: str, docs: list[str]) -> list[int]:
        """Tokens of each (query, doc) pair as the worker tokenises them (truncated)."""
        enc = self.tokenizer(
            [query] * len(docs), docs, truncation="only_second", max_length=self.max_length
        )
        return [len(ids) for ids in enc["input_ids"]]

    def describe(self) -> dict[str, Any]:
        """The parameter split and the formula, for the report."""
        return {
            "formula": "F(L) = 2*P_layers*L + 4*n_layers*d_model*L^2 + 2*P_head per sequence",
            "p_layers": self.p_layers,
            "p_head": self.p_head,
            "p_embeddings_not_counted": self.p_embed,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
        }


def our_padded_flops(
    fm: FlopModel, workload: Workload, lengths: list[list[int]], budget: int, batch_size: int
) -> tuple[float, int]:
    """FLOPs and tokens after padding of the worker's batching, assuming the batcher packs whole
    requests in arrival order up to ``budget`` pairs (what it does when all are queued at once),
    sorts each batch's pairs by token length and pads every chunk of ``batch_size`` to its longest.
    """
    flops, tokens = 0.0, 0
    groups: list[list[int]] = []
    cost = budget + 1
    for i, item in enumerate(workload):
        n = len(item["documents"])
        if cost + n > budget:
            groups.append([])
            cost = 0
        groups[-1].append(i)
        cost += n
    for g in groups:
        flat = [(lengths[i][j], lengths[i][j]) for i in g for j in range(len(lengths[i]))]
        flat.sort(key=lambda t: t[0])
        for s in range(0, len(flat), batch_size):
            chunk = flat[s : s + batch_size]
            longest = max(n for _, n in chunk)
            flops += fm.seq(longest, len(chunk))
            tokens += longest * len(chunk)
    return flops, tokens


# --------------------------------------------------------------------------- our worker

_METRIC = re.compile(
    r'^(gainrag_batch_(?:requests|cost)_(?:count|sum))\{batcher="selector"\} (\S+)'
)


def _batch_metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def _concurrent_rerank(url: str, workload: Workload) -> dict[str, Any]:
    n = len(workload)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        # open every connection before the clock starts
        await asyncio.gather(*(client.get("/health") for _ in range(n)))

        async def one(item: dict[str, Any]) -> tuple[float, dict[str, Any]]:
            t = time.perf_counter()
            r = await client.post("/rerank", json=item)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(item) for item in workload))
        wall = time.perf_counter() - started
    scores0 = [0.0] * len(workload[0]["documents"])
    for res in answers[0][1]["results"]:
        scores0[res["index"]] = res["relevance_score"]
    return {
        "wall_s": wall,
        "latency_s": [a[0] for a in answers],
        "tokens": sum(a[1]["usage"]["total_tokens"] for a in answers),
        "scores_first_query": scores0,
    }


def ours_round(url: str, workload: Workload) -> dict[str, Any]:
    """One round: every query at once; pairs/s from the wall clock; batches from /metrics."""
    before = _batch_metrics(url)
    out = asyncio.run(_concurrent_rerank(url, workload))
    after = _batch_metrics(url)
    pairs = sum(len(w["documents"]) for w in workload)
    batches = after.get("gainrag_batch_requests_count", 0) - before.get(
        "gainrag_batch_requests_count", 0
    )
    out.update(
        pairs=pairs,
        pairs_per_s=pairs / out["wall_s"],
        model_batches=int(batches),
        requests_per_batch=len(workload) / batches if batches else None,
    )
    return out


def selector_worker(settings: dict[str, Any], *, gpu: bool) -> Service:
    """The selector worker with the benchmark's settings; CUDA hidden unless ``gpu``."""
    env = {
        "GAINRAG_SELECTOR__CHECKPOINT": str(settings["checkpoint"]),
        "GAINRAG_SELECTOR__MAX_LENGTH": str(settings["max_length"]),
        "GAINRAG_SELECTOR__BATCH_SIZE": str(settings["batch_size"]),
        "GAINRAG_SELECTOR__MAX_BATCH_PAIRS": str(settings["max_batch_pairs"]),
        "GAINRAG_LOG_LEVEL": "WARNING",
    }
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        # fp32 against FlagReranker fp32 and the fp32 peak; bench_dtype.py measures dtype=auto
        env["GAINRAG_SELECTOR__DTYPE"] = "float32"
    name = "selector_worker_gpu" if gpu else "selector_worker"
    return gainrag_service(name, ["worker", "selector"], LOG_DIR, env, timeout_s=START_S)


# --------------------------------------------------------------------------- baseline


class Baseline:
    """The FlagReranker process in ``.venv-bench``, one round per command."""

    def __init__(
        self, python: Path, checkpoint: Path, workload_file: Path, device: str, variants: list[str]
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log = (LOG_DIR / f"flag_baseline_{device.replace(':', '')}.log").open("ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.proc = subprocess.Popen(
            [
                str(python),
                str(ROOT / "benchmarks" / "_flag_baseline.py"),
                "--model",
                str(checkpoint),
                "--input",
                str(workload_file),
                "--device",
                device,
                "--variants",
                ",".join(variants),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the FlagReranker baseline exited; see {self.log.name}")
        data: dict[str, Any] = json.loads(line)
        return data

    def round(self, variant: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(variant + "\n")
        self.proc.stdin.flush()
        out = self._read()
        out["pairs_per_s"] = out["pairs"] / out["wall_s"]
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def baseline_flops(fm: FlopModel, shapes: list[list[int]]) -> tuple[float, int]:
    """FLOPs and padded tokens of the baseline's forward passes (rows x padded length)."""
    return sum(fm.seq(n, rows) for rows, n in shapes), sum(rows * n for rows, n in shapes)


# --------------------------------------------------------------------------- report


def _median(rounds: list[dict[str, Any]], key: str = "pairs_per_s") -> float:
    return float(statistics.median(r[key] for r in rounds))


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def summarize_side(
    rounds: list[dict[str, Any]], flops_useful: float, flops_executed: float, peak_gflops: float
) -> dict[str, Any]:
    pps = _median(rounds)
    wall = _median(rounds, "wall_s")
    return {
        "pairs_per_s": pps,
        "wall_s_median": wall,
        "rounds_pairs_per_s": [r["pairs_per_s"] for r in rounds],
        "useful_gflops": flops_useful / wall / 1e9,
        "executed_gflops": flops_executed / wall / 1e9,
        "useful_fraction_of_peak": flops_useful / wall / 1e9 / peak_gflops,
        "executed_fraction_of_peak": flops_executed / wall / 1e9 / peak_gflops,
    }


def to_markdown(res: dict[str, Any]) -> str:
    w, c = res["workload"], res["cpu"]
    lines = [
        f"# Selector throughput ({w['queries']} concurrent queries x {w['candidates']} candidates)",
        "",
        f"Model `{w['checkpoint']}`, max_length {w['max_length']}, our batch_size "
        f"{w['batch_size']}, pair budget {w['max_batch_pairs']}; {w['pairs']} pairs, "
        f"{w['useful_tokens']} useful tokens ({w['useful_tokens'] / w['pairs']:.0f} per pair). "
        f"Median of {res['rounds']} rounds of ours, {res['baseline_rounds']} of each baseline; "
        f"torch threads {res['torch_threads']}.",
        "",
        "| CPU | pairs/s | s/round | useful GFLOP/s | executed GFLOP/s | useful / peak |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("ours", f"ours: selector worker, fp32, {w['queries']} concurrent /rerank"),
        ("baseline_default", "FlagReranker default (use_fp16=False; weights stay fp16)"),
        ("baseline_fp32", "FlagReranker + model.float() (fp32)"),
    ):
        s = c.get(key)
        if s:
            lines.append(
                f"| {label} | {s['pairs_per_s']:.1f} | {s['wall_s_median']:.1f} | "
                f"{s['useful_gflops']:.1f} | {s['executed_gflops']:.1f} | "
                f"{s['useful_fraction_of_peak']:.1%} |"
            )
    peak = res["peak_cpu"]
    lines += [
        "",
        f"CPU fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s (sizes "
        f"{list(peak['per_size_gflops'])}, {peak['torch_threads']} threads).",
    ]
    if "ratio" in c:
        lines.append(
            f"**Ratio ours / FlagReranker default: {c['ratio']:.2f}x** (target >= "
            f"{TARGET_RATIO:.1f}: {'met' if res['met'] else 'NOT met'}); "
            f"ours / FlagReranker fp32: {c.get('ratio_vs_fp32', float('nan')):.2f}x."
        )
    g = res.get("gpu")
    if g:
        lines += [
            "",
            "| GPU | pairs/s | s/round | useful TFLOP/s | useful / fp16 peak |",
            "|---|---|---|---|---|",
        ]
        for key, label in (("ours", "ours: worker fp16"), ("baseline_fp16", "FlagReranker fp16")):
            s = g.get(key)
            if s:
                lines.append(
                    f"| {label} | {s['pairs_per_s']:.0f} | {s['wall_s_median']:.3f} | "
                    f"{s['useful_gflops'] / 1000:.2f} | {s['useful_fraction_of_peak']:.1%} |"
                )
        lines.append(f"\nGPU fp16 matmul peak: {g['peak']['gflops'] / 1000:.0f} TFLOP/s.")
    lines += ["", f"Bound: {res['bound']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--queries", type=int, default=16, help="concurrent queries")
    ap.add_argument("--k", type=int, default=100, help="retrieved passages per query (+1 pseudo)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours")
    ap.add_argument(
        "--baseline-rounds",
        type=int,
        default=1,
        help="rounds of each baseline variant (one default round is ~20 min on 2 cores)",
    )
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--batch-size", type=int, default=16, help="our pairs per forward pass (CPU auto: 16)"
    )
    ap.add_argument("--max-batch-pairs", type=int, default=512)
    ap.add_argument("--baseline-python", type=Path, default=DEFAULT_BASELINE_PYTHON)
    ap.add_argument("--baseline-variants", default="default,fp32")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--peak-reps", type=int, default=5)
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU run even with CUDA")
    ap.add_argument("--quick", action="store_true", help="4 queries x 21 candidates, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.queries, args.k, args.rounds, args.baseline_rounds = 4, 20, 1, 1
        args.peak_sizes, args.peak_reps = [1024], 3
    t_start = time.perf_counter()

    questions = question_texts(args.questions, args.queries)
    workload = build_workload(questions, args.k)
    settings = {
        "checkpoint": args.checkpoint,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "max_batch_pairs": args.max_batch_pairs,
    }
    fm = FlopModel(args.checkpoint, args.max_length)
    lengths = [fm.lengths(w["query"], w["documents"]) for w in workload]
    useful_tokens = sum(map(sum, lengths))
    flops_useful = sum(fm.seq(n) for row in lengths for n in row)
    flops_ours, padded_ours = our_padded_flops(
        fm, workload, lengths, args.max_batch_pairs, args.batch_size
    )
    pairs = sum(len(w["documents"]) for w in workload)
    peak_cpu = matmul_peak(args.peak_sizes, args.peak_reps)
    notes: list[str] = []

    tmp = Path(tempfile.mkdtemp(prefix="bench_selector_"))
    workload_file = tmp / "workload.json"
    workload_file.write_text(json.dumps(workload))
    variants = [v for v in args.baseline_variants.split(",") if v]
    baseline: Baseline | None = None
    if not args.no_baseline:
        if not args.baseline_python.is_file():
            raise SystemExit(
                f"{args.baseline_python} is missing: create .venv-bench (see the Makefile's "
                "bench target) or pass --no-baseline"
            )
        baseline = Baseline(args.baseline_python, args.checkpoint, workload_file, "cpu", variants)

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    ours_rounds: list[dict[str, Any]] = []
    base_rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        with selector_worker(settings, gpu=False) as srv:
            ready = httpx.get(srv.url + "/ready", timeout=10).json()
            ours_round(srv.url, workload[:2])  # warm-up, not counted
            for i in range(args.rounds):
                r = ours_round(srv.url, workload)
                ours_rounds.append(r)
                print(f"round {i + 1}: ours {r['pairs_per_s']:.1f} pairs/s", file=sys.stderr)
                if baseline is not None and i < args.baseline_rounds:
                    for v in variants:
                        b = baseline.round(v)
                        base_rounds[v].append(b)
                        print(f"round {i + 1}: FlagReranker {v} {b['pairs_per_s']:.1f} pairs/s",
                              file=sys.stderr)  # fmt: skip
    finally:
        if baseline is not None:
            baseline.close()

    worker_tokens = ours_rounds[0]["tokens"]
    if worker_tokens != useful_tokens:
        notes.append(
            f"the worker reported {worker_tokens} tokens, the local tokenizer count is "
            f"{useful_tokens}"
        )
    cpu: dict[str, Any] = {
        "ours": {
            **summarize_side(ours_rounds, flops_useful, flops_ours, peak_cpu["gflops"]),
            "padded_tokens_estimate": padded_ours,
            "model_batches_per_round": [r["model_batches"] for r in ours_rounds],
            "latency_s_median_round": statistics.median(
                statistics.median(r["latency_s"]) for r in ours_rounds
            ),
            "device": ready.get("models", {}).get("device", "cpu"),
        }
    }
    if baseline is not None:
        cpu["baseline_info"] = baseline.info
        for v in variants:
            rounds = base_rounds[v]
            f_exec, padded = baseline_flops(fm, rounds[0]["shapes"])
            cpu[f"baseline_{v}"] = {
                **summarize_side(rounds, flops_useful, f_exec, peak_cpu["gflops"]),
                "per_query_s_median": statistics.median(
                    x for r in rounds for x in r["per_query_s"]
                ),
                "forward_calls_per_round": rounds[0]["forward_calls"],
                "forward_rows_per_round": rounds[0]["forward_rows"],
                "padded_tokens": padded,
                "dtype": baseline.info["variants"][v]["dtype"],
                "max_abs_score_diff_vs_ours_first_query": _max_abs_diff(
                    baseline.info["variants"][v]["scores_first_query"],
                    ours_rounds[0]["scores_first_query"],
                ),
            }
        if "default" in variants:
            cpu["ratio"] = cpu["ours"]["pairs_per_s"] / cpu["baseline_default"]["pairs_per_s"]
        if "fp32" in variants:
            cpu["ratio_vs_fp32"] = cpu["ours"]["pairs_per_s"] / cpu["baseline_fp32"]["pairs_per_s"]

    gpu: dict[str, Any] | None = None
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = run_gpu(args, settings, workload, fm, flops_useful, flops_ours, workload_file)

    ours = cpu["ours"]
    pad = padded_ours / useful_tokens - 1
    bound = (
        f"CPU GEMM throughput: useful scoring FLOPs run at {ours['useful_fraction_of_peak']:.0%} "
        f"of the measured fp32 matmul peak ({peak_cpu['gflops']:.0f} GFLOP/s, "
        f"{peak_cpu['torch_threads']} threads), {ours['executed_fraction_of_peak']:.0%} counting "
        f"padded tokens (padding adds {pad:.0%} to the tokens: pairs sorted by token length, "
        f"chunks of {args.batch_size}); the rest is small-matrix GEMM efficiency "
        f"(d_model {fm.d_model}), softmax/GELU/LayerNorm, tokenisation and HTTP/JSON"
    )
    met = bool(cpu.get("ratio", 0.0) >= TARGET_RATIO) if baseline is not None else None
    results: dict[str, Any] = {
        "target": f"pairs/s ours / FlagReranker.compute_score per query >= {TARGET_RATIO} on CPU",
        "met": met,
        "bound": bound,
        "rounds": args.rounds,
        "baseline_rounds": args.baseline_rounds,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "workload": {
            "questions": rel(args.questions),
            "queries": len(workload),
            "candidates": args.k + 1,
            "pairs": pairs,
            "useful_tokens": useful_tokens,
            "checkpoint": rel(args.checkpoint),
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "max_batch_pairs": args.max_batch_pairs,
        },
        "flops": {
            **fm.describe(),
            "useful_gflop": flops_useful / 1e9,
            "ours_executed_gflop_estimate": flops_ours / 1e9,
            "ours_padded_tokens_estimate": padded_ours,
        },
        "peak_cpu": peak_cpu,
        "cpu": cpu,
        "gpu": gpu,
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - t_start,
    }
    notes += [
        "Ours: worker answers are timed from the first request sent to the last answer received; "
        "HTTP, JSON and tokenisation are inside the figure.",
        "Ours, executed FLOPs: estimated by replaying the batcher's packing (whole requests in "
        "arrival order up to the pair budget, pairs sorted by token length, chunks of batch_size "
        "padded to their longest); model_batches_per_round comes from the worker's /metrics.",
        "FlagReranker default: with transformers 5 the model loads in the checkpoint's dtype "
        "(fp16 here) and use_fp16=False does not upcast it, so it computes in fp16 on CPU; "
        "compute_score pads all 101 pairs of a query into one batch (batch_size 128) padded to "
        "the longest pair, and its batch-size probe runs that first batch once more before the "
        "scoring loop: forward_calls_per_round = 2 per query.",
        "FlagReranker fp32: the same object after model.float(), the same-precision comparison.",
        "Pseudo-like passage: empty title + the question restated + the top passage's first 90 "
        "words (the real pseudo-passage would need an LLM generation per query).",
    ]
    if args.quick:
        notes.append("--quick: tiny workload, one round; figures are not comparable.")
    write_result(NAME, results, notes=notes, markdown=to_markdown(results))


def run_gpu(
    args: argparse.Namespace,
    settings: dict[str, Any],
    workload: Workload,
    fm: FlopModel,
    flops_useful: float,
    flops_ours: float,
    workload_file: Path,
) -> dict[str, Any]:
    """The worker on the GPU (fp16), and FlagReranker fp16 if .venv-bench's torch has CUDA."""
    peak = matmul_peak([4096, 8192], 10, device="cuda", dtype=torch.float16)
    rounds: list[dict[str, Any]] = []
    with selector_worker(settings, gpu=True) as srv:
        ready = httpx.get(srv.url + "/ready", timeout=10).json()
        ours_round(srv.url, workload)  # warm-up
        for _ in range(max(args.rounds, 5)):
            rounds.append(ours_round(srv.url, workload))
    out: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(0),
        "worker_device": ready.get("models", {}).get("device"),
        "peak": peak,
        "ours": summarize_side(rounds, flops_useful, flops_ours, peak["gflops"]),
    }
    if not args.no_baseline and args.baseline_python.is_file():
        probe = subprocess.run(
            [str(args.baseline_python), "-c", "import torch; print(torch.cuda.is_available())"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == "True":
            b = Baseline(args.baseline_python, args.checkpoint, workload_file, "cuda:0", ["fp16"])
            try:
                brounds = [b.round("fp16") for _ in range(max(args.rounds, 5))]
            finally:
                b.close()
            f_exec, _ = baseline_flops(fm, brounds[0]["shapes"])
            out["baseline_fp16"] = summarize_side(brounds, flops_useful, f_exec, peak["gflops"])
            out["ratio"] = out["ours"]["pairs_per_s"] / out["baseline_fp16"]["pairs_per_s"]
        else:
            out["baseline_fp16"] = None
            out["baseline_note"] = ".venv-bench has CPU-only torch: no GPU baseline"
    return out


if __name__ == "__main__":
    main()
