"""Smoke tests of the benchmark scripts' own arithmetic and plumbing (not of the figures).

The scripts run for minutes on real models; here each one's parser loads, and the pieces that
turn measurements into figures (FLOP counts, padding replay, recall, bandwidth bounds, the raw
HTTP client) are checked on small inputs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks import bench_llm, bench_retrieval, bench_selector

from gainrag.evaluation.qa_metrics import cover_em
from gainrag.evaluation.report import load_report, records_path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "module", ["bench_selector", "bench_retrieval", "bench_llm", "bench_dtype", "bench_engine"]
)
def test_scripts_parse_their_arguments(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout


@pytest.fixture(scope="module")
def flop_model() -> bench_selector.FlopModel:
    return bench_selector.FlopModel(bench_selector.DEFAULT_CHECKPOINT, 512)


def test_flop_model_counts_layers_attention_and_head(flop_model: bench_selector.FlopModel) -> None:
    fm = flop_model
    # MiniLM-L6-H384: 6 layers of 4 d^2 + 2 d (4 d) weights (+ biases, LayerNorms)
    assert (fm.n_layers, fm.d_model) == (6, 384)
    assert 10.5e6 < fm.p_layers < 10.8e6
    one = fm.seq(100)
    assert one == pytest.approx(2 * fm.p_layers * 100 + 4 * 6 * 384 * 100**2 + 2 * fm.p_head)
    assert fm.seq(100, rows=3) == pytest.approx(3 * one)
    assert fm.lengths("who", ["a b c", "x " * 2000])[1] == 512  # truncated like the worker


def test_padding_replay_packs_requests_by_budget(flop_model: bench_selector.FlopModel) -> None:
    workload = [{"query": "q", "documents": ["d" * n for n in (1, 2, 3)]} for _ in range(3)]
    lengths = [[10, 20, 30] for _ in range(3)]
    # budget 6 pairs: requests 1+2 together, 3 alone; chunks of 2 padded to their longest
    flops, tokens = bench_selector.our_padded_flops(flop_model, workload, lengths, 6, 2)
    # batch 1 sorted: 10 10 20 20 30 30 -> chunks (10,10) (20,20) (30,30): no padding
    # batch 2: 10 20 30 -> (10,20) -> 2 x 20, (30) -> 30
    assert tokens == 20 + 40 + 60 + 40 + 30
    assert flops == pytest.approx(
        flop_model.seq(10, 2) + flop_model.seq(20, 2) + flop_model.seq(30, 2)
        + flop_model.seq(20, 2) + flop_model.seq(30, 1)
    )  # fmt: skip


def test_matmul_peak_is_positive() -> None:
    peak = bench_selector.matmul_peak([128], 2)
    assert peak["gflops"] > 0 and peak["per_size_gflops"]["128"] == peak["gflops"]


def test_recall_and_nlist() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert bench_retrieval.recall_at(found, truth) == pytest.approx((0.5 + 1.0) / 2)
    assert bench_retrieval.default_nlist(1_000_000) == 4096
    assert bench_retrieval.default_nlist(100_000) == 1024


def test_synthetic_vectors_are_unit_and_clustered() -> None:
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((4, bench_retrieval.DIM), dtype=np.float32)
    bench_retrieval._normalize(centroids)
    x = bench_retrieval.make_vectors("clustered", 500, 1, centroids)
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    best = (x @ centroids.T).max(axis=1)
    assert 0.6 < float(best.mean()) < 0.8  # ~1/sqrt(2) from its own centroid
    u = bench_retrieval.make_vectors("uniform", 500, 1, None)
    assert abs(float((u[:250] * u[250:]).sum(axis=1).mean())) < 0.05


def test_raw_connection_reads_keep_alive_responses() -> None:
    async def main() -> list[bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(n)
                out = json.dumps({"echo": json.loads(body)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out) + out)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = bench_retrieval.RawConnection(port)
        await conn.open()
        try:
            return [await conn.post("/x", {"i": i}) for i in range(2)]
        finally:
            await conn.close()
            server.close()
            await server.wait_closed()

    got = asyncio.run(main())
    assert [json.loads(b) for b in got] == [{"echo": {"i": 0}}, {"echo": {"i": 1}}]


def test_llm_bounds_and_weight_bytes() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    facts = bench_llm.weight_facts(model)
    assert facts["tied_embeddings"] is True
    assert facts["weight_bytes_per_step"] == facts["param_bytes"]
    assert facts["kv_bytes_per_token_of_context"] == 2 * 2 * 2 * 4 * 4  # K+V, layers, heads, dim
    bw = {"copy_gb_s": 10.0, "read_gb_s": 20.0}
    b = bench_llm.bounds(facts, bw, peak_gflops=1e6, gemv_gb_s=5.0, batch=1, context=0)
    assert b["memory_bound_tokens_per_s"] == pytest.approx(10e9 / facts["param_bytes"])
    assert b["limited_by"] == "memory"
    assert b["gemv_bound_tokens_per_s"] == pytest.approx(5e9 / facts["param_bytes"])
    b8 = bench_llm.bounds(facts, bw, peak_gflops=1e-3, gemv_gb_s=5.0, batch=8, context=0)
    assert b8["limited_by"] == "compute"


def test_memory_bandwidth_small_buffer() -> None:
    bw = bench_llm.memory_bandwidth(1 << 20, 2, "cpu")
    assert bw["copy_gb_s"] > 0 and bw["read_gb_s"] > 0
    assert bench_llm.gemv_bandwidth(1 << 20, 64, 1, 2, "cpu", torch.float32) > 0


def _eval_tables(results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--dir", str(results), "--sets", "nq_dev", *extra]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.eval_tables", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert out.returncode == 0, out.stderr
    return out


def test_eval_tables_reads_the_directory_it_is_given(tmp_path: Path) -> None:
    report = load_report(BENCH / "results" / "eval_nq_dev_retrieval.json")
    report["em"], report["n"] = 0.5, 7  # not the committed figures: proves this file was read
    (tmp_path / "eval_nq_dev_retrieval.json").write_text(json.dumps(report))
    out = _eval_tables(tmp_path)
    rows = [
        line for line in out.stdout.splitlines() if line.startswith("| ") and "preset" not in line
    ]
    # acc is recomputed from the predictions of a report older than the metric
    acc = sum(cover_em(r["prediction"], r["answers"]) for r in report["records"])
    acc_cell = f"{100 * acc / len(report['records']):.1f}"
    assert len(rows) == 1, out.stdout
    assert rows[0].startswith(f"| retrieval | 7 | 0 | {acc_cell} | 50.0 |"), out.stdout
    assert "**nq_dev** (n = 7, k = 20)" in out.stdout
    assert "vs" not in out.stdout  # one preset: nothing to pair


def test_eval_tables_pairs_presets_question_by_question(tmp_path: Path) -> None:
    base = load_report(BENCH / "results" / "eval_nq_dev_retrieval.json")
    other = json.loads(json.dumps(base))
    other["preset"] = "rerank"
    right = [r for r in other["records"] if r["em"] == 1.0]
    wrong = [r for r in other["records"] if r["em"] == 0.0]
    for r in wrong[:3]:
        r["em"] = 1.0
    right[0]["em"] = 0.0
    (tmp_path / "eval_nq_dev_retrieval.json").write_text(json.dumps(base))
    (tmp_path / "eval_nq_dev_rerank.json").write_text(json.dumps(other))
    out = _eval_tables(tmp_path)
    # 3 wins, 1 loss: p = 2 * (1 + 4) / 2**4 = 0.625
    assert "| `rerank` vs `retrieval` | 3 | 1 | 0.625 |" in out.stdout, out.stdout
    # acc is paired too: the predictions did not change, so no question differs
    assert "| acc (cover-EM), question by question |" in out.stdout
    assert "| `rerank` vs `retrieval` | 0 | 0 | 1.000 |" in out.stdout


def test_eval_tables_versus_compares_a_slice_with_another_run(tmp_path: Path) -> None:
    full = load_report(BENCH / "results" / "eval_nq_dev_retrieval.json")
    for i, r in enumerate(full["records"]):  # a known pattern: every third question right
        r["em"] = 1.0 if i % 3 == 0 else 0.0
        r["prediction"], r["answers"] = ("yes", ["yes"]) if i % 3 == 0 else ("no", ["yes"])
    part = json.loads(json.dumps(full))
    part["records"] = part["records"][:10]  # the slice: questions 0..9 (0, 3, 6, 9 right)
    for r in part["records"][1:3]:  # the slice gets 1 and 2 right as well ...
        r["em"], r["prediction"] = 1.0, "yes"
    part["records"][9]["em"], part["records"][9]["prediction"] = 0.0, "no"  # ... and loses 9
    (tmp_path / "full").mkdir()
    (tmp_path / "slice").mkdir()
    (tmp_path / "full" / "eval_nq_dev_retrieval.json").write_text(json.dumps(full))
    (tmp_path / "slice" / "eval_nq_dev_retrieval.json").write_text(json.dumps(part))
    out = _eval_tables(tmp_path / "slice", "--versus", str(tmp_path / "full"))
    # only the 10 shared questions: 5 / 10 right vs 4 / 10; 2 wins, 1 loss: p = 2 * 4 / 8 = 1.0
    label = str(tmp_path / "full")
    assert f"| preset | metric | questions | this run | {label} |" in out.stdout, out.stdout
    assert "| `retrieval` | acc | 10 | 50.0 | 40.0 | 2 | 1 | 1.000 |" in out.stdout, out.stdout
    assert "| `retrieval` | em | 10 | 50.0 | 40.0 | 2 | 1 | 1.000 |" in out.stdout, out.stdout


def test_compress_results_converts_old_reports_losslessly(tmp_path: Path) -> None:
    from benchmarks import compress_results

    base = load_report(BENCH / "results" / "eval_nq_dev_retrieval.json")
    other = {**base, "preset": "rerank", "records": base["records"][::-1][:50]}
    old = {"eval_nq_dev_retrieval.json": base, "eval_nq_dev_rerank.json": other}
    for name, report in old.items():  # the old layout: records inline
        (tmp_path / name).write_text(json.dumps(report, indent=2))
    (tmp_path / "compare_x.json").write_text('{"a": "rerank"}')  # not a report: left alone
    tables = _eval_tables(tmp_path).stdout
    assert compress_results.main(["--check", str(tmp_path)]) == 1  # inline records are flagged
    assert compress_results.main([str(tmp_path)]) == 0
    for name, report in old.items():
        assert isinstance(json.loads((tmp_path / name).read_text())["records"], dict)
        assert records_path(tmp_path / name).is_file()
        assert json.dumps(load_report(tmp_path / name)) == json.dumps(report)
    assert (tmp_path / "compare_x.json").read_text() == '{"a": "rerank"}'
    assert _eval_tables(tmp_path).stdout == tables  # the same tables and sign tests
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert compress_results.main([str(tmp_path)]) == 0  # again: nothing to do, nothing changes
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert compress_results.main(["--check", str(tmp_path)]) == 0


def test_committed_eval_reports_are_compressed() -> None:
    # A report committed with inline records (~600 KB a run) would grow the repository again.
    from benchmarks import compress_results

    assert compress_results.main(["--check", str(BENCH / "results")]) == 0


def _make_n(*args: str) -> str:
    out = subprocess.run(
        ["make", "-n", *args], cwd=BENCH.parent, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.replace("\\\n", " ").split())  # continuations joined


def test_make_eval_qwen_runs_the_eval_loop_with_qwen_into_its_own_directory() -> None:
    loop = _make_n("eval-qwen", "EVAL_SETS=nq_dev", "EVAL_PRESETS=gainrag")
    assert "GAINRAG_LLM__MODEL=qwen2.5-coder-0.5b .venv/bin/gainrag prepare" in loop  # converts it
    assert "--limit 200" in loop and "for p in gainrag" in loop
    assert "--output benchmarks/results/qwen/eval_" in loop
    # the serving k unless EVAL_K is given (EVAL_K=20: the published k = 20 tables)
    assert "GAINRAG_RETRIEVAL__K" not in loop
    loop20 = _make_n("eval-qwen", "EVAL_SETS=nq_dev", "EVAL_PRESETS=gainrag", "EVAL_K=20")
    assert "GAINRAG_LLM__MODEL=qwen2.5-coder-0.5b GAINRAG_RETRIEVAL__K=20" in loop20


def test_gain_signal_stats_by_hand(tmp_path: Path) -> None:
    from benchmarks import gain_signal_stats as gss

    def row(qid: str, ppls: dict[str, float], answer: set[str]) -> str:
        cands = [
            {"id": c, "ppl": p, "has_answer": c in answer, "retrieval_rank": i}
            for i, (c, p) in enumerate(ppls.items())
        ]
        return json.dumps({"id": qid, "candidates": cands, "scorer": "s"}) + "\n"

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        row("q1", {"x": 3.0, "y": 1.0, "z": 2.0}, {"y"}) + row("q2", {"x": 1.0, "y": 2.0}, {"x"})
    )
    b.write_text(row("q1", {"x": 1.0, "y": 2.0, "z": 3.0, "w": 0.5}, {"y"}))
    sa, sb = gss.load(a), gss.load(b)
    d = gss.describe(sa)
    # q1: best y (has answer, not top-1 x); q2: best x (has answer, top-1)
    assert d["best_has_answer"] == 1.0 and d["top1_has_answer"] == 0.5
    assert d["best_is_top1"] == 0.5 and d["best_is_pseudo"] == 0.0
    # q1 only, over x, y, z: a ranks y < z < x, b ranks x < y < z -> rho = -0.5; bests differ
    agree = gss.agreement(sa, sb)
    assert agree["questions"] == 1 and agree["same_best"] == 0.0
    assert agree["spearman_mean"] == pytest.approx(-0.5)
    assert gss.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
