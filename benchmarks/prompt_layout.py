"""The reader prompt with the instruction before the passage, against the served layout (issue 25).

With the instruction first, llama.cpp's slot cache reuses ~46 prompt tokens instead of ~31 (the
chat template's head), so each answer prefills ~15 fewer tokens. This asks the default reader
(Qwen2.5-Coder-1.5B Q4_K_M in a llama-server with the managed engine's flags) every question of
both full dev sets with the passage the served default selected (read from an eval report of
it), greedy, 32 new tokens, first line kept as the answer, and scores acc / EM / F1 against the
report's own answers (paired sign test). Resumes from its JSONL output.

    python -m benchmarks.prompt_layout   # --report-dir: another eval of the served default
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, ROOT, write_result
from gainrag.config import Settings
from gainrag.evaluation.qa_metrics import cover_em, exact_match, f1_score, sign_test_p
from gainrag.evaluation.report import load_report
from gainrag.llm import prompts
from gainrag.llm.llamacpp_engine import LlamaServer, slot_context, usable_cores
from gainrag.types import Passage
from gainrag.weights import gguf_path
from gainrag_harness import free_port

REPORTS = ROOT / "benchmarks" / "results" / "full" / "k-100" / "mix-0.5" / "served-openvino"
OUT = LOG_DIR / "prompt_layout.jsonl"
SETS = ("nq_dev", "squad_dev")


def instruction_first(question: str, passage: Passage, max_words: int) -> str:
    """The served answer prompt's parts, the instruction moved before the passage."""
    body = prompts.render_passages([passage], max_words)
    return f"### Instruction:\n{prompts.ANSWER_INSTRUCTION}\n\n{body}\n\n### Input:\n{question}\n"


async def ask_all(url: str, rows: list[tuple[str, dict[str, Any], Passage]], words: int) -> None:
    done = {json.loads(x)["key"] for x in OUT.read_text().splitlines()} if OUT.exists() else set()
    sem = asyncio.Semaphore(8)  # as the full-dev-set evals: 8 in flight on 4 slots
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        with OUT.open("a") as out:

            async def one(name: str, rec: dict[str, Any], passage: Passage) -> None:
                key = f"{name}:{rec['id']}"
                if key in done:
                    return
                message = prompts.neutralize_control_text(
                    instruction_first(rec["question"], passage, words)
                )
                payload = {
                    "messages": [{"role": "user", "content": message}],
                    "max_tokens": 32,
                    "temperature": 0.0,
                }
                async with sem:
                    body = (await client.post("/v1/chat/completions", json=payload)).json()
                pred = prompts.clean_answer(body["choices"][0]["message"]["content"] or "")
                t = body.get("timings", {})
                row = {
                    "key": key,
                    "set": name,
                    "prediction": pred,
                    "acc": cover_em(pred, rec["answers"]),
                    "em": exact_match(pred, rec["answers"]),
                    "f1": f1_score(pred, rec["answers"]),
                    "served": {m: rec[m] for m in ("acc", "em", "f1")},
                    "prompt_n": t.get("prompt_n"),
                    "cache_n": t.get("cache_n"),
                }
                out.write(json.dumps(row) + "\n")
                out.flush()

            await asyncio.gather(*(one(*r) for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-dir", type=Path, default=REPORTS)
    a = ap.parse_args()
    settings = Settings()
    passages = {}
    with settings.retrieval.index_dir.joinpath("passages.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            passages[d["id"]] = Passage(d["id"], d["title"], d["text"])
    rows = []
    for name in SETS:
        report = load_report(a.report_dir / f"eval_{name}_gainrag-no-pseudo.json")
        rows += [(name, r, passages[r["selected_ids"][0]]) for r in report["records"]]
    llm = settings.llm
    # the managed engine's own server: the same command line the service runs
    server = LlamaServer(
        llm.engine_bin,
        gguf_path(llm.model, llm.models_dir.expanduser()),
        alias=llm.model,
        port=free_port(),
        parallel=llm.engine_parallel,
        slot_ctx=slot_context(llm),
        threads=llm.engine_threads or usable_cores(),
        log_path=LOG_DIR / "prompt_layout-llama.log",
    )
    server.start(llm.engine_startup_s)
    try:
        asyncio.run(ask_all(server.url, rows, llm.max_passage_words))
    finally:
        server.stop()
    got = [json.loads(x) for x in OUT.read_text().splitlines()]
    results: dict[str, Any] = {"report_dir": str(a.report_dir), "sets": {}}
    lines = [
        "| set | metric | served layout | instruction first | wins / losses (p) |",
        "|---|---|---|---|---|",
    ]
    for name in SETS:
        r = [x for x in got if x["set"] == name]
        per: dict[str, Any] = {"n": len(r)}
        for m in ("acc", "em", "f1"):
            new = 100 * sum(x[m] for x in r) / len(r)
            old = 100 * sum(x["served"][m] for x in r) / len(r)
            wins = sum(x[m] > x["served"][m] for x in r)
            losses = sum(x[m] < x["served"][m] for x in r)
            per[m] = {"served": old, "instruction_first": new, "wins": wins, "losses": losses}
            test = f"{wins} / {losses} (p = {sign_test_p(wins, losses):.3f})" if m != "f1" else ""
            lines.append(f"| {name} (n = {len(r)}) | {m} | {old:.1f} | {new:.1f} | {test} |")
        warm = [x["prompt_n"] for x in r if (x["cache_n"] or 0) >= 40]
        per["uncached_prompt_tokens_mean"] = sum(warm) / len(warm) if warm else None
        results["sets"][name] = per
    write_result("prompt_layout", results, markdown="\n".join(lines))


if __name__ == "__main__":
    main()
