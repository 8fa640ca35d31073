"""``POST /answer`` of the old default against the new one, and the new one against its floor.

- **old**: the default before the hardware work: SmolLM2-135M in-process (transformers, fp32),
  every torch component in fp32, selection after both retrieval and the pseudo-passage;
- **new**: today's defaults: the default reader in the managed llama.cpp engine, dtype ``auto``,
  pipelined selection.

Each mode is started alone (one gateway at a time, so they never compete for the CPU) and asked
the same questions at concurrency 1 and 16, bypassing the cache. The **floor** of each request of
the new mode is the time its critical path would take at this machine's limits, measured in the
same run:

    floor = max(retrieve + select_k, pseudo + select_1) + generate
    pseudo, generate = prefill FLOPs / peak + output tokens * weight bytes per token / bandwidth
    select_k, select_1, retrieve = cross-encoder / bi-encoder + flat-index FLOPs / peak

with ``peak`` the best torch matmul GFLOP/s over the dtypes the CPU supports, ``bandwidth`` the
STREAM copy/triad GB/s (``bench_engine``), token counts from the reader's tokenizer on the exact
prompts and outputs of the response, prefill FLOPs = 2 x non-embedding parameters per prompt token
(+ one output projection), and the retrieved candidates' pair lengths from the selector's
tokenizer. The floor is a batch-1 figure: it is compared with the p50 at concurrency 1; at
concurrency 16 the report gives p50 and throughput.

    python -m benchmarks.bench_floor [--limit 10] [--limit16 32] [--modes old,new]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.bench_engine import gguf_facts, stream_bandwidth
from benchmarks.bench_selector import FlopModel
from benchmarks.common import (
    LOG_DIR,
    QUESTIONS,
    START_S,
    ask_answers,
    matmul_peak,
    pct,
    question_texts,
    table,
    write_result,
)
from gainrag.config import Settings
from gainrag.hardware import cpu_features
from gainrag.llm import prompts
from gainrag.types import Passage
from gainrag.weights import gguf_path, gguf_tokenizer, resolve_encoder
from gainrag_harness import gainrag_service

NAME = "floor"
OLD = {
    "GAINRAG_LLM__BACKEND": "transformers",
    "GAINRAG_LLM__MODEL": "smollm2-135m",
    "GAINRAG_LLM__DTYPE": "float32",
    "GAINRAG_SELECTOR__DTYPE": "float32",
    "GAINRAG_RETRIEVAL__DTYPE": "float32",
    "GAINRAG_PIPELINE__PIPELINED_SELECTION": "false",
}
MODES: dict[str, dict[str, str]] = {"old": OLD, "new": {}}


async def ask(url: str, questions: list[str], concurrency: int) -> dict[str, Any]:
    """Every question once with ``concurrency`` in flight (candidates returned: the floor's
    selection terms need them); responses and wall time."""
    out, wall = await ask_answers(url, questions, concurrency, {"return_candidates": True})
    return {"responses": out, "wall_s": wall, "concurrency": concurrency}


class Floor:
    """The batch-1 critical path of one answered request at the machine's limits."""

    def __init__(self, settings: Settings, peak_gflops: float, gb_s: float) -> None:
        from transformers import AutoTokenizer

        llm, s = settings.llm, settings.selector
        gguf = gguf_path(llm.model, llm.models_dir)
        self.facts = gguf_facts(gguf)
        self.params = _gguf_params(gguf)
        self.tok = AutoTokenizer.from_pretrained(gguf_tokenizer(llm.model, llm.models_dir))
        self.peak = peak_gflops * 1e9
        self.s_per_token = self.facts["weight_bytes_per_token"] / (gb_s * 1e9)
        assert s.checkpoint is not None
        self.selector = FlopModel(s.checkpoint, s.max_length)
        self.encoder = FlopModel(resolve_encoder(settings.retrieval.encoder), 256)
        self.settings = settings

    def _chat_tokens(self, message: str) -> int:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompts.neutralize_control_text(message)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        return len(self.tok(str(text), add_special_tokens=False)["input_ids"])

    def _out_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"]) + 1  # + end of turn

    def _llm(self, prompt_tokens: int, out_tokens: int) -> float:
        prefill = (
            2.0 * self.params["layers"] * prompt_tokens + 2.0 * self.params["output"]
        ) / self.peak
        return prefill + out_tokens * self.s_per_token

    def request(self, question: str, body: dict[str, Any]) -> dict[str, float]:
        """Seconds of each floor term for one response (``return_candidates`` on)."""
        cands = body.get("candidates") or []
        retrieved = [c for c in cands if not c["pseudo"]]
        pseudo = body.get("pseudo_passage") or ""
        docs = [Passage(c["id"], c["title"], c["text"]).as_candidate_text() for c in retrieved]
        sel_k = (
            sum(self.selector.seq(n) for n in self.selector.lengths(question, docs))
            if docs
            else 0.0
        )
        pseudo_doc = Passage("pseudo", "", pseudo, pseudo=True).as_candidate_text()
        sel_1 = (
            self.selector.seq(self.selector.lengths(question, [pseudo_doc])[0]) if pseudo else 0.0
        )
        q_len = len(self.encoder.tokenizer(question)["input_ids"])
        count, dim = _index_shape(self.settings)
        retrieve = self.encoder.seq(q_len) + 2.0 * count * dim  # flat inner-product search
        max_new = self.settings.llm.max_new_tokens_pseudo
        t_pseudo = self._llm(
            self._chat_tokens(prompts.pseudo_prompt(question)),
            min(self._out_tokens(pseudo), max_new),
        )
        selected = [
            Passage(p["id"], p["title"], p["text"], pseudo=p["pseudo"]) for p in body["passages"]
        ]
        answer_prompt = prompts.answer_prompt(
            question, selected, self.settings.llm.max_passage_words
        )
        t_gen = self._llm(self._chat_tokens(answer_prompt), self._out_tokens(body["answer"]))
        branch_r = (retrieve + sel_k) / self.peak
        branch_p = t_pseudo + sel_1 / self.peak
        return {
            "retrieve_select_k_s": branch_r,
            "pseudo_select_1_s": branch_p,
            "generate_s": t_gen,
            "floor_s": max(branch_r, branch_p) + t_gen,
        }


def _gguf_params(path: Path) -> dict[str, int]:
    """Parameters of the layers (one multiply-add per prompt token) and of the output projection."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: int(t.n_elements) for t in reader.tensors}
    embd = tensors["token_embd.weight"]
    output = tensors.get("output.weight", embd)  # tied: the embedding is the projection
    layers = sum(n for name, n in tensors.items() if name.startswith("blk."))
    return {"layers": layers, "output": output, "embedding": embd}


def _index_shape(settings: Settings) -> tuple[int, int]:
    """Vectors and dimensions of the flat index (the search is one pass over all of them)."""
    from gainrag.retrieval.index import read_manifest

    manifest = read_manifest(settings.retrieval.index_dir) or {}
    return int(manifest.get("count", 0)), int(manifest.get("dim", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--limit", type=int, default=10, help="questions at concurrency 1")
    ap.add_argument("--limit16", type=int, default=32, help="questions at concurrency 16")
    ap.add_argument("--modes", default="old,new")
    a = ap.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    threads = len(os.sched_getaffinity(0))

    # The machine's limits, measured first (nothing else of ours running).
    bw = stream_bandwidth(512, 5, threads)
    torch.set_num_threads(threads)
    peaks = {"float32": matmul_peak([1024, 2048], 5)}
    if cpu_features().flags & {"avx512_bf16", "amx_bf16"}:
        peaks["bfloat16"] = matmul_peak([1024, 2048], 5, dtype=torch.bfloat16)
    best = max(peaks, key=lambda d: peaks[d]["gflops"])
    limits = {
        "bandwidth": bw,
        "peaks": {d: p["gflops"] for d, p in peaks.items()},
        "best_dtype": best,
        "peak_gflops": peaks[best]["gflops"],
    }
    print("limits:", limits["peaks"], f"{bw['gb_s']:.1f} GB/s")

    q1 = question_texts(a.questions, a.limit)
    q16 = question_texts(a.questions, a.limit16)
    results: dict[str, Any] = {"limits": limits, "modes": {}}
    for mode in a.modes.split(","):
        env = MODES[mode]
        with gainrag_service(
            f"gateway-{mode}", ["serve"], LOG_DIR, env=env, timeout_s=START_S
        ) as svc:
            asyncio.run(ask(svc.url, q1[:1], 1))  # warm-up (first-call allocations)
            runs = {c: asyncio.run(ask(svc.url, qs, c)) for c, qs in ((1, q1), (16, q16))}
            models = httpx.get(svc.url + "/ready", timeout=30).json()
        out: dict[str, Any] = {"env": env, "models": models}
        for c, run in runs.items():
            ok = [r for r in run["responses"] if r["status"] == 200]
            totals = [r["body"]["timings_ms"]["total"] for r in ok]
            # Selection time that ran behind the other branch instead of after both (0 when
            # selection is not pipelined: then the parts are not measured separately).
            saving = [
                max(
                    0.0,
                    r["body"]["timings_ms"].get("select_retrieved", 0.0)
                    + r["body"]["timings_ms"].get("select_pseudo", 0.0)
                    - r["body"]["timings_ms"]["select"],
                )
                if r["body"]["timings_ms"].get("select_retrieved", 0.0) > 0
                else 0.0
                for r in ok
            ]
            out[f"c{c}"] = {
                "errors": len(run["responses"]) - len(ok),
                "total_ms": pct(totals) if totals else None,
                "client_ms": pct([r["client_ms"] for r in ok]) if ok else None,
                "answers_per_s": len(ok) / run["wall_s"],
                "pipelining_saving_ms": pct(saving) if ok else None,
                "stages_ms_p50": {
                    k: statistics.median(r["body"]["timings_ms"].get(k, 0.0) for r in ok)
                    for k in (
                        "retrieve",
                        "pseudo",
                        "select",
                        "select_retrieved",
                        "select_pseudo",
                        "generate",
                    )
                }
                if ok
                else None,
            }
            if c == 1 and mode == "new" and ok:
                settings = Settings()
                floor = Floor(settings, limits["peak_gflops"], bw["gb_s"])
                per = [floor.request(r["question"], r["body"]) for r in ok]
                ratios = [t / 1000 / f["floor_s"] for t, f in zip(totals, per, strict=True)]
                out["c1"]["floor"] = {
                    "floor_ms": pct([f["floor_s"] * 1000 for f in per]),
                    "terms_ms_p50": {
                        k: 1000 * statistics.median(f[k] for f in per)
                        for k in ("retrieve_select_k_s", "pseudo_select_1_s", "generate_s")
                    },
                    "total_over_floor": pct(ratios),
                    "llm": {"model": settings.llm.model, **floor.facts, "params": floor.params},
                }
            out[f"c{c}"]["sample"] = [
                {"question": r["question"], "answer": r["body"].get("answer")} for r in ok[:5]
            ]
        results["modes"][mode] = out

    rows = []
    for mode, m in results["modes"].items():
        for c in (1, 16):
            x = m[f"c{c}"]
            if x["total_ms"] is None:
                rows.append([mode, c, "all failed", "", "", "", ""])
                continue
            fl = x.get("floor")
            rows.append(
                [
                    mode,
                    c,
                    f"{x['total_ms']['p50']:.0f}",
                    f"{x['total_ms']['p95']:.0f}",
                    f"{x['answers_per_s']:.2f}",
                    f"{x['pipelining_saving_ms']['p50']:.0f}",
                    f"{fl['floor_ms']['p50']:.0f} ({fl['total_over_floor']['p50']:.2f}x)"
                    if fl
                    else "",
                ]
            )
    new, old = results["modes"].get("new"), results["modes"].get("old")
    lines = table(
        [
            "mode",
            "concurrency",
            "p50 ms",
            "p95 ms",
            "answers/s",
            "pipelining saving p50 ms",
            "floor p50 ms (p50 total/floor)",
        ],
        rows,
    )
    if new and old:
        for c in (1, 16):
            r = old[f"c{c}"]["total_ms"]["p50"] / new[f"c{c}"]["total_ms"]["p50"]
            lines.append(f"\nold / new p50 at concurrency {c}: {r:.2f}x")
    lines.append(
        f"\nLimits: peak {limits['peak_gflops']:.0f} GFLOP/s ({best}), "
        f"bandwidth {bw['gb_s']:.1f} GB/s; target: new p50 at concurrency 1 <= 1.5x floor."
    )
    write_result(NAME, results, markdown="\n".join(lines))


if __name__ == "__main__":
    main()
