"""Ingestion: passages/s through ``POST /v1/documents`` of a running gateway, where a write's time
goes, and how soon a posted document is answered from.

The gateway runs in its default configuration (``gainrag serve``: the managed llama.cpp reader,
the OpenVINO/torch selector as ``auto`` picks) on a private copy of ``var/index`` (the shipped
corpus, 11,774 passages), so FAISS and BM25 work at their real size. Documents are Markdown built
from corpus passages (``## title`` + text, ``--per-doc`` passages each, ~100 words apiece), new ids.

1. Throughput: ``--docs`` documents posted one request at a time with 1 and with ``--batch``
   documents per request: client wall time, passages/s, and the server's own split / encode /
   commit / apply times from the responses. Encoding (the bi-encoder in float32) is the bound.
2. Deletes: each document of the first run deleted, one request each.
3. Posted, then answered from: a short Markdown note with a made-up fact, then ``/answer``
   about it (the cache bypassed); the time of each, and whether the answer cites the note.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import LOG_DIR, ROOT, START_S, pct, table, write_result
from gainrag_harness import gainrag_service

NOTE = """# The Quintaria field guide

## Birds

The zorbleflax of Quintaria is a bright teal bird that nests only on the island's northern
cliffs. Fishermen say that a zorbleflax seen at dawn means calm seas for three days.
"""
NOTE_QUESTION = "What colour is the zorbleflax of Quintaria?"


def documents(corpus: Path, n: int, per_doc: int, prefix: str) -> list[dict[str, Any]]:
    """``n`` Markdown documents of ``per_doc`` corpus passages each (the 2wiki part: whole
    Wikipedia paragraphs with titles)."""
    rows = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("source") == "2wiki":
                rows.append(row)
            if len(rows) >= n * per_doc:
                break
    out = []
    for i in range(n):
        chunk = rows[i * per_doc : (i + 1) * per_doc]
        text = "\n\n".join(f"## {r['title']}\n\n{r['text']}" for r in chunk)
        out.append({"id": f"{prefix}-{i}", "title": f"Bench document {i}", "text": text,
                    "format": "markdown"})  # fmt: skip
    return out


def post_all(client: httpx.Client, docs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Post ``docs`` ``batch`` at a time, one request after another."""
    walls: list[float] = []
    server: dict[str, list[float]] = {}
    passages = 0
    start = time.perf_counter()
    for i in range(0, len(docs), batch):
        t = time.perf_counter()
        r = client.post("/v1/documents", json={"documents": docs[i : i + batch]})
        walls.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        body = r.json()
        passages += body["passages_added"]
        for stage, ms in body["timings_ms"].items():
            server.setdefault(stage, []).append(ms)
    wall = time.perf_counter() - start
    return {
        "documents": len(docs),
        "per_request": batch,
        "passages": passages,
        "wall_s": round(wall, 2),
        "passages_per_s": round(passages / wall, 1),
        "request_ms": pct(walls),
        "server_ms_sum": {k: round(sum(v), 1) for k, v in server.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=30, help="documents per run")
    ap.add_argument("--per-doc", type=int, default=10, help="corpus passages per document")
    ap.add_argument("--batch", type=int, default=10, help="documents per request, second run")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus.jsonl")
    ap.add_argument("--index", type=Path, default=ROOT / "var" / "index")
    args = ap.parse_args()

    work = LOG_DIR / "ingest-index"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.index, work)
    env = {"GAINRAG_RETRIEVAL__INDEX_DIR": str(work)}
    runs: list[dict[str, Any]] = []
    with (
        gainrag_service("serve", ["serve"], LOG_DIR, env, timeout_s=START_S) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        models = client.get("/ready").json()["models"]
        client.post("/v1/documents", json={"documents": [{"id": "warm", "text": "Warm-up."}]})
        single = documents(args.corpus, args.docs, args.per_doc, "one")
        runs.append(post_all(client, single, 1))
        batched = documents(args.corpus, args.docs, args.per_doc, "batch")
        batched = [{**d, "text": d["text"] + "\n\nSecond copy."} for d in batched]
        runs.append(post_all(client, batched, args.batch))
        deletes: list[float] = []
        for d in single:
            t = time.perf_counter()
            client.delete(f"/v1/documents/{d['id']}").raise_for_status()
            deletes.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        posted = client.post(
            "/v1/documents",
            json={"documents": [{"id": "note", "text": NOTE, "format": "markdown"}]},
        )
        post_ms = (time.perf_counter() - t) * 1000
        posted.raise_for_status()
        t = time.perf_counter()
        answer = client.post(
            "/answer", json={"question": NOTE_QUESTION}, headers={"cache-control": "no-cache"}
        )
        answer_ms = (time.perf_counter() - t) * 1000
        answer.raise_for_status()
        body = answer.json()
        top = body["passages"][0]
        answered = {
            "post_ms": round(post_ms, 1),
            "answer_ms": round(answer_ms, 1),
            "cited_document": top.get("document_id"),
            "answer": body["answer"],
        }
    results = {
        "index_passages_at_start": 11_774,
        "models": models,
        "runs": runs,
        "delete_ms": pct(deletes),
        "posted_then_answered": answered,
        "bound": "encoding: the bi-encoder in float32 over each passage (stored vectors do not "
        "depend on the machine); split, commit and apply are milliseconds",
    }
    dels = results["delete_ms"]
    lines = ["# Ingestion through POST /v1/documents", ""]
    lines += table(
        ["documents per request", "documents", "passages", "wall s", "passages/s",
         "request p50 ms", "server split / encode / commit / apply ms (sum)"],
        [
            [r["per_request"], r["documents"], r["passages"], r["wall_s"], r["passages_per_s"],
             round(r["request_ms"]["p50"], 1),
             " / ".join(str(r["server_ms_sum"].get(s, 0)) for s in
                        ("split", "encode", "commit", "apply"))]
            for r in runs
        ],
    )  # fmt: skip
    enc = [
        r["server_ms_sum"].get("encode", 0) / max(1, r["server_ms_sum"].get("total", 1))
        for r in runs
    ]
    lines += [
        "",
        f"Encoding is {statistics.mean(enc) * 100:.0f}% of the server's time per write. "
        f"Delete: p50 {dels['p50']:.1f} ms, p95 {dels['p95']:.1f} ms "
        f"({len(deletes)} documents of {args.per_doc} passages).",
        "",
        f"Posted, then answered from: POST {answered['post_ms']} ms, then /answer "
        f"{answered['answer_ms']} ms citing `{answered['cited_document']}`: "
        f'"{answered["answer"].strip()[:80]}".',
    ]
    write_result("ingest", results, markdown="\n".join(lines))


if __name__ == "__main__":
    main()
