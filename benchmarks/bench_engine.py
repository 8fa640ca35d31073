"""The managed llama.cpp engine (llama-server, ``GAINRAG_LLM__BACKEND=llamacpp``): decode tokens/s
at batch 1 against the memory-bandwidth bound, prompt tokens/s, and aggregate tokens/s with 1, 4
and 8 parallel slots, for each bundled GGUF model that is installed.

Measured through the engine exactly as the gateway starts it (:class:`LlamaServer`: the binary
`make llm-engine` built, ``--threads`` = usable cores, ``OMP_WAIT_POLICY=PASSIVE``), with the
server's own per-request timings (``/completion``'s ``timings``: prompt and decode phases timed
inside llama.cpp, no HTTP in them):

- decode at batch 1: ``predicted_per_second`` of N greedy tokens (``ignore_eos``: always N) after
  the pseudo-passage prompt of an nq_dev question;
- prompt: ``prompt_per_second`` of a ~500-token prompt (``cache_prompt`` off, so all of it);
- aggregate with P slots: P such requests at once; tokens/s = all decoded tokens / the longest
  request's decode time (decode phase), and / wall time from sending to the last reply (with the
  prompts).

The bound: a decode step reads every weight the token needs once, plus the KV cache of its context,
so tokens/s <= bandwidth / bytes per token (batch B: B x bandwidth / (weights + B x KV)). Bytes per
token come from the GGUF's tensors (the ``gguf`` package: their quantised sizes on disk, which is
what llama.cpp streams): every tensor once, except the token embedding, of which a step reads one
row -- unless the model ties its embeddings (no ``output.weight``: the embedding matrix is also
the output projection, read whole every step), as SmolLM2 and Qwen2.5 do. The bandwidth is
STREAM's copy and triad kernels over buffers far larger than the caches, with torch on every usable
core; the bound uses the better of the two (the stricter bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import LOG_DIR, QUESTIONS, question_texts, table, write_result
from gainrag_harness import free_port

NAME = "engine"
CORPUS = QUESTIONS.parents[1] / "corpus.jsonl"


# --------------------------------------------------------------------------- bandwidth


def stream_bandwidth(mib: int, reps: int, threads: int) -> dict[str, Any]:
    """Best-of-``reps`` GB/s of STREAM's copy (a = b: 2 arrays moved) and triad (a = b + s c:
    3 arrays) with torch on ``threads`` threads, three fp32 arrays of ``mib`` MiB each."""
    torch.set_num_threads(threads)
    n = (mib << 20) // 4
    a, b, c = torch.zeros(n), torch.ones(n), torch.full((n,), 2.0)
    a.copy_(b)  # fault every page in before timing
    best_copy = best_triad = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a.copy_(b)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best_triad = min(best_triad, time.perf_counter() - t)
    assert float(a[0]) == 7.0  # the triad ran
    del a, b, c
    copy, triad = 2 * n * 4 / best_copy / 1e9, 3 * n * 4 / best_triad / 1e9
    return {
        "array_bytes": n * 4,
        "copy_gb_s": copy,
        "triad_gb_s": triad,
        "gb_s": max(copy, triad),
        "reps": reps,
        "threads": threads,
    }


# --------------------------------------------------------------------------- GGUF facts


def gguf_facts(path: Path) -> dict[str, Any]:
    """Bytes a decode token reads from the weights, and KV-cache bytes per token of context."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    tensors = {t.name: t for t in reader.tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embd = tensors["token_embd.weight"]
    n_vocab = int(embd.shape[-1])
    tied = "output.weight" not in tensors
    # Untied: the embedding is a lookup (one row); tied: it is also the output projection.
    per_token = total if tied else total - int(embd.n_bytes) + int(embd.n_bytes) // n_vocab
    n_layer, n_embd = field("block_count"), field("embedding_length")
    n_head, n_head_kv = field("attention.head_count"), field("attention.head_count_kv")
    try:
        head_dim = field("attention.key_length")
    except KeyError:
        head_dim = n_embd // n_head
    types = sorted({t.tensor_type.name for t in tensors.values()})
    return {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "tensor_bytes": total,
        "weight_bytes_per_token": per_token,
        "tied_embeddings": tied,
        "token_embd_bytes": int(embd.n_bytes),
        "token_embd_type": embd.tensor_type.name,
        "tensor_types": types,
        "n_layer": n_layer,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        # f16 K and V (llama-server's default cache type) for every layer
        "kv_bytes_per_context_token": 2 * n_layer * n_head_kv * head_dim * 2,
    }


# --------------------------------------------------------------------------- measurements


async def _complete(c: httpx.AsyncClient, prompt: str, n: int) -> dict[str, Any]:
    body = {
        "prompt": prompt,
        "n_predict": n,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
    }
    r = await c.post("/completion", json=body)
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


async def _template(c: httpx.AsyncClient, message: str) -> str:
    r = await c.post("/apply-template", json={"messages": [{"role": "user", "content": message}]})
    r.raise_for_status()
    return str(r.json()["prompt"])


async def measure(
    url: str, prompts: list[str], long_prompt: str, slots: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Batch-1 decode and prompt speed (with 1 slot), or the aggregate of ``slots`` at once."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        texts = [await _template(c, p) for p in prompts[:slots]]
        await _complete(c, texts[0], 4)  # warm-up: first-touch of the weights
        out: dict[str, Any] = {"slots": slots, "new_tokens": new_tokens}
        if slots == 1:
            runs = [(await _complete(c, texts[0], new_tokens))["timings"] for _ in range(repeats)]
            decode = [t["predicted_per_second"] for t in runs]
            long = await _template(c, long_prompt)
            pre = [(await _complete(c, long, 1))["timings"] for _ in range(repeats)]
            out |= {
                "prompt_tokens": runs[0]["prompt_n"],
                "decode_tokens_per_s": statistics.median(decode),
                "decode_tokens_per_s_best": max(decode),
                "decode_runs": decode,
                "prefill_prompt_tokens": pre[0]["prompt_n"],
                "prompt_tokens_per_s": statistics.median(t["prompt_per_second"] for t in pre),
            }
        aggs, walls = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            res = await asyncio.gather(*(_complete(c, x, new_tokens) for x in texts))
            wall = time.perf_counter() - t
            tok = sum(r["timings"]["predicted_n"] for r in res)
            aggs.append(tok / (max(r["timings"]["predicted_ms"] for r in res) / 1000))
            walls.append(tok / wall)
        out |= {
            "aggregate_decode_tokens_per_s": statistics.median(aggs),
            "aggregate_wall_tokens_per_s": statistics.median(walls),
        }
        return out


def bound(facts: dict[str, Any], gb_s: float, batch: int, context: float) -> float:
    """Tokens/s if every step only streamed its bytes at ``gb_s``."""
    step = facts["weight_bytes_per_token"] + batch * context * facts["kv_bytes_per_context_token"]
    return batch * gb_s * 1e9 / step


def run_model(
    name: str, args: argparse.Namespace, bw: dict[str, Any], threads: int
) -> dict[str, Any]:
    from gainrag.config import Settings
    from gainrag.errors import ConfigurationError
    from gainrag.llm.llamacpp_engine import LlamaServer, engine_key
    from gainrag.llm.prompts import pseudo_prompt
    from gainrag.weights import gguf_path

    llm = Settings().llm
    try:
        path = gguf_path(name, llm.models_dir)
    except ConfigurationError as exc:
        print(f"{name}: skipped ({exc.message})")
        return {"model": name, "skipped": exc.message}
    facts = gguf_facts(path)
    questions = question_texts(args.questions, max(args.parallel))
    prompts = [pseudo_prompt(q) for q in questions]
    words: list[str] = []
    with CORPUS.open() as f:
        for line in f:
            words += json.loads(line)["text"].split()
            if len(words) >= 380:
                break
    long_prompt = "Summarise:\n" + " ".join(words[:380])
    rows: list[dict[str, Any]] = []
    for slots in args.parallel:
        server = LlamaServer(
            llm.engine_bin, path, alias=name, port=free_port(), parallel=slots,
            slot_ctx=1024 + args.new_tokens, threads=threads,
            log_path=LOG_DIR / f"engine-{name}-p{slots}.log",
        )  # fmt: skip
        server.start(600)
        try:
            r = asyncio.run(
                measure(server.url, prompts, long_prompt, slots, args.new_tokens, args.repeats)
            )
        finally:
            server.stop()
        if slots == 1:
            context = r["prompt_tokens"] + args.new_tokens / 2
            r["bound_tokens_per_s"] = bound(facts, bw["gb_s"], 1, context)
            r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
            r["effective_gb_s"] = r["decode_tokens_per_s"] * facts["weight_bytes_per_token"] / 1e9
        rows.append(r)
        shown = {k: v for k, v in r.items() if k != "decode_runs"}
        print(f"{name} slots={slots}: {json.dumps(shown)}")
    return {"model": name, "gguf": facts, "engine": engine_key(llm.engine_bin), "runs": rows}


def to_markdown(res: dict[str, Any]) -> str:
    bw = res["bandwidth"]
    lines = [
        "# llama.cpp engine: decode against the memory-bandwidth bound",
        "",
        f"Memory bandwidth (STREAM, torch, {bw['threads']} threads): copy {bw['copy_gb_s']:.1f} "
        f"GB/s, triad {bw['triad_gb_s']:.1f} GB/s; llama-server threads: {res['threads']}.",
        "",
    ]
    slots = "/".join(str(p) for p in res["parallel"])
    head = [
        "model", "weight MB/token", "prompt tok/s", "decode tok/s (b=1)", "bound tok/s",
        "% of bound", f"tok/s with {slots} slots (decode)", f"tok/s with {slots} slots (wall)",
    ]  # fmt: skip
    rows = []
    for m in res["models"]:
        if "skipped" in m:
            rows.append([m["model"], "skipped: " + m["skipped"], "", "", "", "", "", ""])
            continue
        b1 = next(r for r in m["runs"] if r["slots"] == 1)
        agg = " / ".join(f"{r['aggregate_decode_tokens_per_s']:.1f}" for r in m["runs"])
        wall = " / ".join(f"{r['aggregate_wall_tokens_per_s']:.1f}" for r in m["runs"])
        rows.append([
            m["model"], f"{m['gguf']['weight_bytes_per_token'] / 1e6:.1f}",
            f"{b1['prompt_tokens_per_s']:.0f}", f"{b1['decode_tokens_per_s']:.1f}",
            f"{b1['bound_tokens_per_s']:.1f}", f"{b1['fraction_of_bound']:.0%}", agg, wall,
        ])  # fmt: skip
    lines += table(head, rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    from gainrag.llm.llamacpp_engine import usable_cores
    from gainrag.weights import BUNDLED_LLMS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(BUNDLED_LLMS))
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = usable cores")
    ap.add_argument("--bandwidth-mib", type=int, default=512)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--quick", action="store_true", help="SmolLM2, 32 tokens, P = 1 and 4, once")
    args = ap.parse_args()
    if args.quick:
        args.models, args.parallel, args.new_tokens, args.repeats = ["smollm2-135m"], [1, 4], 32, 1
        args.bandwidth_mib = 256
    if 1 not in args.parallel:
        args.parallel = [1, *args.parallel]
    threads = args.threads or usable_cores()
    started = time.perf_counter()
    bw = stream_bandwidth(args.bandwidth_mib, 5, threads)
    print(f"bandwidth: copy {bw['copy_gb_s']:.1f} GB/s, triad {bw['triad_gb_s']:.1f} GB/s")
    models = [run_model(m, args, bw, threads) for m in args.models]
    results: dict[str, Any] = {
        "target": "decode at batch 1 >= 70% of the memory-bandwidth bound (default reader)",
        "bandwidth": bw,
        "threads": threads,
        "parallel": args.parallel,
        "models": models,
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - started,
    }
    notes = [
        "Timings are llama-server's own (timings.prompt_per_second, predicted_per_second); "
        "decode runs use ignore_eos so every request decodes exactly --new-tokens tokens.",
        "Bytes per token: the GGUF's tensor bytes (quantised, as streamed); tied embeddings "
        "count the whole embedding matrix (it is the output projection), untied ones one row; "
        "plus f16 K+V of the mean context (prompt + half the new tokens).",
        "Bandwidth: the better of STREAM copy (2 arrays) and triad (3 arrays), torch, fp32, "
        "arrays of --bandwidth-mib MiB; write-allocate traffic not counted (as STREAM).",
        "Aggregate (decode): all decoded tokens / the longest request's decode phase; (wall): "
        "/ the time from sending P requests to the last reply, prompts included.",
    ]
    if args.quick:
        notes.append("--quick: SmolLM2 only, 32 tokens, one repeat; figures are noisy.")
    write_result(NAME, results, notes=notes, markdown=to_markdown(results))


if __name__ == "__main__":
    main()
