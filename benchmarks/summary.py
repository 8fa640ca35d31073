"""The README's performance table from ``benchmarks/results/*.json`` (last step of ``make bench``).

Every row is read from a result file written by a benchmark in this directory; a missing file
is reported as "not run", never filled in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from benchmarks.common import RESULTS
from gainrag_harness import machine_line

Row = tuple[str, str, str, str]  # figure, measured, target, what bounds it


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _met(flag: object) -> str:
    return {True: "met", False: "**missed**"}.get(flag, "–")  # type: ignore[call-overload]


def fanout(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    ratios = res["target"]["ratio_p50"]
    levels = res["levels"]
    cells = ", ".join(
        f"c={c}: {ratios[c]:.3f} (total p50 {levels[c]['stages_ms']['total']['p50'] / 1000:.1f} s)"
        for c in sorted(ratios, key=int)
    )
    rows: list[Row] = [
        (
            "1. fan-out: `/answer` total / (max(retrieve, pseudo) + select + generate), p50",
            cells,
            f"<= 1.10: {_met(res['target']['met'])}",
            res["bound"],
        )
    ]
    if cmp := res.get("pipelined_vs_not"):  # result files before pipelined selection lack it
        saving = ", ".join(
            f"c={c}: total p50 off - on {cmp[c]['total_p50_off_minus_on_ms'] / 1000:.2f} s, "
            f"per-request saving p50 {cmp[c]['pipelined_saving_ms']['p50'] / 1000:.2f} s"
            for c in sorted(cmp, key=int)
        )
        rows.append(
            (
                "1b. pipelined selection on vs off: `/answer` p50",
                saving,
                "shown (no target)",
                "same questions, one mode at a time; the saving is the selection time hidden "
                "behind the other branch",
            )
        )
    return rows


def gateway(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    by_c = {row["concurrency"]: row for row in res["levels"]}
    t = res["target"]
    row = by_c[t["concurrency"]]
    one = by_c.get(1)
    first = f"c=1: p50 {one['p50_ms']:.2f} ms; " if one else ""
    return [
        (
            "2. gateway overhead (instant stand-ins, wrk)",
            f"{first}c={t['concurrency']}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; "
            f"max {res['max_rps']:.0f} req/s",
            f"p50 < 5 ms at c=32: {_met(t['met'])}",
            res["bound"],
        )
    ]


def selector(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    cpu = res["cpu"]
    ours = cpu["ours"]
    parts = [f"ours {ours['pairs_per_s']:.1f} pairs/s"]
    if "baseline_default" in cpu:
        parts.append(f"FlagReranker {cpu['baseline_default']['pairs_per_s']:.1f}")
    if "baseline_fp32" in cpu:
        parts.append(f"FlagReranker fp32 {cpu['baseline_fp32']['pairs_per_s']:.1f}")
    ratio = cpu.get("ratio")
    ratio_txt = f"; ratio {ratio:.2f}x" if ratio is not None else ""
    if "ratio_vs_fp32" in cpu:
        ratio_txt += f" ({cpu['ratio_vs_fp32']:.2f}x vs fp32)"
    rows: list[Row] = [
        (
            "3. selector: 16 concurrent queries x 101 candidates, CPU",
            ", ".join(parts) + ratio_txt,
            f"ratio >= 1.0: {_met(res.get('met'))}",
            "see the FLOP/s row",
        ),
        (
            "3. selector: achieved FLOP/s / measured matmul peak",
            f"{ours['useful_fraction_of_peak']:.0%} useful, "
            f"{ours['executed_fraction_of_peak']:.0%} executed "
            f"(peak {res['peak_cpu']['gflops']:.0f} GFLOP/s fp32)",
            "report",
            res.get("bound", ""),
        ),
    ]
    gpu = res.get("gpu")
    rows.append(
        (
            "3. selector on GPU",
            f"{gpu['ours']['pairs_per_s']:.0f} pairs/s" if gpu else "no GPU on this machine",
            "report when available",
            "",
        )
    )
    return rows


def retrieval(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    rows: list[Row] = []
    w = res.get("worker") or {}
    if w:
        pts = ", ".join(f"b={p['batch']}: {p['request']['queries_per_s']:.0f}" for p in w["points"])
        rows.append(
            (
                f"4. retrieval worker, shipped index ({w['passages']:,} passages), queries/s",
                pts,
                "report",
                res.get("bound", ""),
            )
        )
    for kind, syn in (res.get("synthetic") or {}).items():
        flat = syn["flat"]
        cells = [
            f"flat {flat['latency_ms_batch1']['p50']:.1f} ms",
            *(
                f"IVF{syn['ivf']['nlist']} nprobe {x['nprobe']}: {x['recall_at_10']:.3f}, "
                f"{x['latency_ms_batch1']['p50']:.2f} ms"
                for x in syn.get("ivf", {}).get("sweep", [])
            ),
            *(
                f"HNSW{syn['hnsw']['M']} ef {x['ef_search']}: {x['recall_at_10']:.3f}, "
                f"{x['latency_ms_batch1']['p50']:.2f} ms"
                for x in syn.get("hnsw", {}).get("sweep", [])
            ),
        ]
        rows.append(
            (
                f"4. synthetic {syn['n']:,} x 384 ({kind}): recall@10 vs flat, p50 at batch 1",
                "; ".join(cells),
                "report",
                "",
            )
        )
    return rows


def llm(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    rows: list[Row] = []
    for b in res["batches"]:
        rows.append(
            (
                f"5. LLM decode, batch {b['batch']} ({res['llm']}, {res['device']})",
                f"{b['decode_tokens_per_s']:.1f} tok/s vs memory-bandwidth bound "
                f"{b['bound']['bound_tokens_per_s']:.1f} ({b['fraction_of_bound']:.0%})",
                "report the fraction",
                res["bound"] if b is res["batches"][0] else "",
            )
        )
    return rows


def engine(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    rows: list[Row] = []
    for m in res["models"]:
        if "skipped" in m:
            continue
        b1 = next(x for x in m["runs"] if x["slots"] == 1)
        agg = ", ".join(
            f"{x['slots']}: {x['aggregate_decode_tokens_per_s']:.1f}" for x in m["runs"]
        )
        rows.append(
            (
                f"5b. llama.cpp engine decode, batch 1 ({m['model']})",
                f"{b1['decode_tokens_per_s']:.1f} tok/s vs memory-bandwidth bound "
                f"{b1['bound_tokens_per_s']:.1f} ({b1['fraction_of_bound']:.0%}); "
                f"prompt {b1['prompt_tokens_per_s']:.0f} tok/s; slots: tok/s {agg}",
                ">= 70% of the bound (default reader)",
                f"{m['gguf']['weight_bytes_per_token'] / 1e6:.0f} MB read per token at "
                f"{res['bandwidth']['gb_s']:.1f} GB/s (STREAM)",
            )
        )
    return rows


def cache(r: dict[str, Any]) -> list[Row]:
    res = r["results"]
    return [
        (
            "6. `/answer` on a cache hit, p50 (client / server)",
            f"{res['hit_client_ms']['p50']:.1f} ms / {res['hit_server_total_ms']['p50']:.1f} ms "
            f"(uncached p50 {res['miss_client_ms']['p50'] / 1000:.1f} s)",
            "report",
            res["bound"],
        )
    ]


def loadtest(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, sc in r["results"]["scenarios"].items():
        cells = ", ".join(
            f"{lv['users']}: {lv['ok_rps']:.2f}/s p50 {lv['latency_ms']['p50']:,.0f} ms"
            for lv in sc["levels"]
        )
        rows.append((f"load test, {name} (users: answers/s, p50)", cells, "report", ""))
    return rows


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[Row]]]] = [
    ("answer_fanout", fanout),
    ("gateway", gateway),
    ("selector", selector),
    ("retrieval", retrieval),
    ("llm", llm),
    ("engine", engine),
    ("cache", cache),
    ("loadtest/loadtest", loadtest),
]


def main() -> None:
    """Write summary.md (with what bounds each figure) and summary_short.md (for the README)."""
    full = ["| figure | measured | target | what bounds it |", "|---|---|---|---|"]
    short = ["| figure | measured | target |", "|---|---|---|"]
    machine = None
    for name, fn in SECTIONS:
        r = _load(name)
        if r is None:
            full.append(f"| {name} | not run | | |")
            short.append(f"| {name} | not run | |")
            continue
        machine = machine or r["machine"]
        for fig, val, target, bound in fn(r):
            full.append(f"| {fig} | {val} | {target} | {bound} |")
            short.append(f"| {fig} | {val} | {target} |")
    if machine:
        line = f"Machine: {machine_line(machine)}."
        full += ["", line]
        short += ["", line]
    for stem, lines in (("summary", full), ("summary_short", short)):
        out = RESULTS / f"{stem}.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    print("\n".join(full))


if __name__ == "__main__":
    main()
