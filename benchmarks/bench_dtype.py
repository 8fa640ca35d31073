"""dtype = auto on this machine: matmul peaks per dtype, what auto chose and what it buys.

- Peaks: best-of-``--peak-reps`` GFLOP/s of square ``torch.matmul`` for float32, bfloat16 and
  float16 (whatever the CPU emulates is measured too; a size is skipped once one call of a dtype
  takes over ``--peak-max-s``). The best over dtypes is "the peak".
- The choice: ``gainrag.hardware`` for the selector's, the query encoder's and the LLM's shapes
  (the CPU flags, torch's kernel level, each shape's measured bf16/fp32 ratio and the reason).
- Selector: the in-process ``CrossEncoderScorer`` (the worker's model, no HTTP) with dtype auto
  and float32 side by side in one process, rounds alternating; ``--queries`` dev questions x
  ``--k`` real candidates (nearest passages by the fp32 bi-encoder among the questions' gold
  passages and ``--pool`` other corpus passages). Pairs/s, and achieved FLOP/s (the FLOP model
  of bench_selector.py on each pass's padded tokens) as a fraction of the best peak.
- Query encoder: questions/s of ``BiEncoder.encode`` in batches of 16, auto vs float32.

Writes benchmarks/results/dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_selector import DEFAULT_CHECKPOINT, FlopModel
from benchmarks.common import ROOT, write_result
from gainrag.evaluation.questions import passage_pool
from gainrag.hardware import choose_dtype, cpu_features, linear_shapes
from gainrag.retrieval.encoder import BiEncoder
from gainrag.selector.cross_encoder import CrossEncoderScorer
from gainrag.weights import resolve_encoder

NAME = "dtype"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def peaks(sizes: list[int], reps: int, max_s: float) -> dict[str, Any]:
    """GFLOP/s of square matmuls per dtype (FLOP = 2 n^3), best over sizes and reps."""
    out: dict[str, Any] = {}
    for dtype in DTYPES:
        per: dict[str, float] = {}
        for n in sizes:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            t = time.perf_counter()
            torch.matmul(a, b)  # warm-up, and the guard against minutes of emulation
            if time.perf_counter() - t > max_s:
                per[str(n)] = 2.0 * n**3 / (time.perf_counter() - t) / 1e9
                break
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - t)
            per[str(n)] = 2.0 * n**3 / best / 1e9
        name = str(dtype).removeprefix("torch.")
        out[name] = {"gflops": max(per.values()), "per_size_gflops": per}
    best_name = max(out, key=lambda k: out[k]["gflops"])
    return {
        "per_dtype": out,
        "best_dtype": best_name,
        "best_gflops": out[best_name]["gflops"],
        "sizes": sizes,
        "reps": reps,
        "torch_threads": torch.get_num_threads(),
    }


def candidate_sets(questions: list[dict[str, Any]], k: int, pool_others: int) -> list[list[str]]:
    """``k`` real candidates per question: the fp32 bi-encoder's nearest pool passages."""
    pool = passage_pool(ROOT / "data/corpus.jsonl", questions, pool_others)
    enc = BiEncoder(resolve_encoder("all-MiniLM-L6-v2"), dtype="float32")
    pv = enc.encode([p.as_candidate_text() for p in pool])
    qv = enc.encode([q["question"] for q in questions])
    top = np.argsort(-(qv @ pv.T), axis=1)[:, :k]
    return [[pool[j].as_candidate_text() for j in row] for row in top]


def executed_flops(fm: FlopModel, tokens: list[int], batch_size: int) -> float:
    """FLOPs of the scorer's passes: pairs sorted by tokens, chunks padded to their longest."""
    order = sorted(tokens)
    return sum(
        fm.seq(max(order[s : s + batch_size]), len(order[s : s + batch_size]))
        for s in range(0, len(order), batch_size)
    )


def selector_side_by_side(
    args: argparse.Namespace, pairs: list[tuple[str, str]], best_peak: float
) -> dict[str, Any]:
    """Pairs/s of dtype auto and float32, alternating rounds in this process."""
    fm = FlopModel(args.checkpoint, args.max_length)
    scorers = {
        name: CrossEncoderScorer(
            args.checkpoint, max_length=args.max_length, batch_size=args.batch_size, dtype=name
        )
        for name in ("auto", "float32")
    }
    walls: dict[str, list[float]] = {name: [] for name in scorers}
    scores: dict[str, list[float]] = {}
    tokens: list[int] = []
    for s in scorers.values():  # warm-up, not counted
        s.score_pairs(pairs[: args.batch_size])
    for _ in range(args.rounds):
        for name, s in scorers.items():
            t = time.perf_counter()
            scores[name], tokens = s.score_pairs_counted(pairs)
            walls[name].append(time.perf_counter() - t)
    useful = sum(fm.seq(n) for n in tokens)
    executed = executed_flops(fm, tokens, args.batch_size)
    out: dict[str, Any] = {"pairs": len(pairs), "useful_tokens": sum(tokens)}
    for name, s in scorers.items():
        wall = statistics.median(walls[name])
        out[name] = {
            "dtype": s.dtype.dtype,
            "wall_s": walls[name],
            "wall_s_median": wall,
            "pairs_per_s": len(pairs) / wall,
            "useful_gflops": useful / wall / 1e9,
            "executed_gflops": executed / wall / 1e9,
            "useful_fraction_of_best_peak": useful / wall / 1e9 / best_peak,
            "executed_fraction_of_best_peak": executed / wall / 1e9 / best_peak,
        }
    out["speedup_auto_over_fp32"] = out["auto"]["pairs_per_s"] / out["float32"]["pairs_per_s"]
    out["speedup_per_round_median"] = statistics.median(
        f / a for a, f in zip(walls["auto"], walls["float32"], strict=True)
    )
    out["max_abs_score_diff"] = max(
        abs(a - b) for a, b in zip(scores["auto"], scores["float32"], strict=True)
    )
    return out


def encoder_side_by_side(questions: list[str], rounds: int) -> dict[str, Any]:
    """Questions/s of query encoding (batches of 16), auto vs float32."""
    encs = {
        name: BiEncoder(resolve_encoder("all-MiniLM-L6-v2"), dtype=name)
        for name in ("auto", "float32")
    }
    walls: dict[str, list[float]] = {name: [] for name in encs}
    for e in encs.values():
        e.encode(questions[:16], batch_size=16)
    for _ in range(rounds):
        for name, e in encs.items():
            t = time.perf_counter()
            e.encode(questions, batch_size=16)
            walls[name].append(time.perf_counter() - t)
    out: dict[str, Any] = {"questions": len(questions), "batch_size": 16}
    for name, e in encs.items():
        out[name] = {
            "dtype": e.dtype.dtype,
            "questions_per_s": len(questions) / statistics.median(walls[name]),
        }
    out["speedup_auto_over_fp32"] = (
        out["auto"]["questions_per_s"] / out["float32"]["questions_per_s"]
    )
    return out


def choices(batch_size: int, llm_batch: int) -> dict[str, Any]:
    """What auto picks for each component's shapes on this machine, and why."""
    from transformers import AutoConfig

    from gainrag.config import Settings
    from gainrag.weights import prepare_llm

    minilm = AutoConfig.from_pretrained(DEFAULT_CHECKPOINT)
    shapes = {
        "selector": linear_shapes(minilm, [batch_size * 128]),
        "bi-encoder (queries)": linear_shapes(minilm, [16, 2048]),
    }
    llm = Settings().llm
    try:
        cfg = AutoConfig.from_pretrained(prepare_llm(llm.model, llm.models_dir))
        shapes[f"llm ({llm.model})"] = linear_shapes(cfg, [1, llm_batch])
    except Exception as exc:  # the converted LLM may be absent; the rest still stands
        shapes[f"llm ({llm.model}): not measured ({type(exc).__name__})"] = []
    out: dict[str, Any] = {}
    for comp, sh in shapes.items():
        if not sh:
            out[comp] = None
            continue
        c = choose_dtype("auto", "cpu", sh)
        out[comp] = {
            "dtype": c.dtype,
            "reason": c.reason,
            "speedups": [
                {"shape": list(s.shape), "fp32_ms": s.fp32_ms, "bf16_ms": s.bf16_ms,
                 "ratio": s.ratio}
                for s in c.speedups
            ],
        }  # fmt: skip
    return out


def to_markdown(res: dict[str, Any]) -> str:
    """The human-readable report."""
    f = res["cpu_features"]
    p = res["peaks"]
    lines = [
        "# dtype = auto on this machine",
        "",
        f"CPU flags: {', '.join(f['flags']) or 'none of the bf16/AMX flags'}; torch CPU "
        f"capability {f['torch_capability']}; torch threads {p['torch_threads']}.",
        "",
        "| matmul dtype | peak GFLOP/s | per size |",
        "|---|---|---|",
    ]
    for name, d in p["per_dtype"].items():
        sizes = ", ".join(f"{n}: {g:.0f}" for n, g in d["per_size_gflops"].items())
        best = " (best)" if name == p["best_dtype"] else ""
        lines.append(f"| {name}{best} | {d['gflops']:.1f} | {sizes} |")
    lines += ["", "| component | auto chose | why |", "|---|---|---|"]
    for comp, c in res["choices"].items():
        if c is not None:
            lines.append(f"| {comp} | {c['dtype']} | {c['reason']} |")
    s = res["selector"]
    lines += [
        "",
        f"## Selector: {res['workload']['queries']} dev questions x {res['workload']['k']} real "
        f"candidates ({s['pairs']} pairs, {s['useful_tokens']} tokens), max_length "
        f"{res['workload']['max_length']}, batch {res['workload']['batch_size']}, "
        f"median of {res['rounds']} alternating rounds",
        "",
        "| dtype | pairs/s | s/round | useful GFLOP/s | executed GFLOP/s | useful / best peak |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("auto", "float32"):
        d = s[key]
        label = f"auto ({d['dtype']})" if key == "auto" else "float32"
        lines.append(
            f"| {label} | {d['pairs_per_s']:.1f} | {d['wall_s_median']:.2f} | "
            f"{d['useful_gflops']:.1f} | {d['executed_gflops']:.1f} | "
            f"{d['useful_fraction_of_best_peak']:.1%} |"
        )
    e = res["encoder"]
    lines += [
        "",
        f"**Selector auto / fp32: {s['speedup_auto_over_fp32']:.2f}x** (median of per-round "
        f"ratios {s['speedup_per_round_median']:.2f}x); max |score difference| "
        f"{s['max_abs_score_diff']:.3f} logits. Best peak: {p['best_gflops']:.0f} GFLOP/s "
        f"({p['best_dtype']}).",
        "",
        f"Query encoder ({e['questions']} questions, batches of {e['batch_size']}): auto "
        f"({e['auto']['dtype']}) {e['auto']['questions_per_s']:.0f} q/s, float32 "
        f"{e['float32']['questions_per_s']:.0f} q/s: {e['speedup_auto_over_fp32']:.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=16, help="dev questions (half NQ, half SQuAD)")
    ap.add_argument("--k", type=int, default=20, help="candidates per question")
    ap.add_argument("--pool", type=int, default=200, help="corpus passages besides the golds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per pass (CPU default)")
    ap.add_argument("--llm-batch", type=int, default=8, help="the LLM's max_batch_size")
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--peak-reps", type=int, default=5)
    ap.add_argument("--peak-max-s", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="4 questions x 8 candidates, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.queries, args.k, args.rounds, args.pool = 4, 8, 1, 40
        args.peak_sizes, args.peak_reps = [512], 2
    t0 = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for name in ("nq_dev", "squad_dev"):
        with (ROOT / "data/questions" / f"{name}.jsonl").open() as fh:
            lines = fh.readlines()
        step = max(1, len(lines) // args.queries)
        rows += [json.loads(x) for x in lines[::step][: (args.queries + 1) // 2]]
    rows = rows[: args.queries]
    feats = cpu_features()
    peak = peaks(args.peak_sizes, args.peak_reps, args.peak_max_s)
    chosen = choices(args.batch_size, args.llm_batch)
    cands = candidate_sets(rows, args.k, args.pool)
    pairs = [(q["question"], d) for q, docs in zip(rows, cands, strict=True) for d in docs]
    sel = selector_side_by_side(args, pairs, peak["best_gflops"])
    enc = encoder_side_by_side([q["question"] for q in rows] * 4, args.rounds)
    results: dict[str, Any] = {
        "cpu_features": {
            "model": feats.model,
            "flags": sorted(
                f for f in feats.flags if f in ("amx_tile", "amx_bf16", "avx512_bf16", "bf16")
            ),
            "torch_capability": feats.capability,
        },
        "peaks": peak,
        "choices": chosen,
        "workload": {
            "queries": len(rows),
            "k": args.k,
            "pool_others": args.pool,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "checkpoint": str(args.checkpoint.relative_to(ROOT))
            if args.checkpoint.is_relative_to(ROOT)
            else str(args.checkpoint),
        },
        "rounds": args.rounds,
        "selector": sel,
        "encoder": enc,
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - t0,
    }
    notes = [
        "auto and float32 run in one process, rounds alternating, so load from other processes "
        "hits both alike; medians.",
        "FLOP model: bench_selector.FlopModel (2*P_layers*L + 4*n_layers*d*L^2 + 2*P_head per "
        "sequence); executed = padded to each pass's longest pair.",
        "The auto choice is re-measured by this script (the same micro-benchmark the service runs "
        "at start-up), so it may differ from a service started at another moment on a loaded "
        "machine.",
    ]
    if args.quick:
        notes.append("--quick: tiny workload; figures are not comparable.")
    md = to_markdown(results)
    write_result(NAME, results, notes=notes, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
