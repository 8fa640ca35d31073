"""LLM generation: tokens/s of the in-process backend against the memory-bandwidth bound.

Loads the generator exactly as the service does (``prepare_llm`` + the pipeline's
``_build_generator``: TransformersGenerator, ``GAINRAG_LLM__DTYPE``, its tokenizer and left
padding) and measures greedy generation of a fixed number of new tokens on pseudo-passage prompts
(``gainrag.llm.prompts.pseudo_prompt`` over nq_dev questions, rendered with the chat template):

- prefill: time of ``generate(max_new_tokens=1)`` (time to first token);
- decode: ``(T(N) - T(1)) / (N - 1)`` per step, with
  ``generate(max_new_tokens=N, min_new_tokens=N)``;
- the same with a bare forward loop over the KV cache (no ``generate``), which shows how much of a
  step is ``generate``'s own per-step overhead.

Bound: a decode step must read every weight once (for all sequences of the batch) plus each
sequence's KV cache, so tokens/s <= batch * bandwidth / (weight bytes + batch * KV bytes), with
the bandwidth measured here by copying a large buffer (read + write bytes counted); the compute
bound (2 FLOP per weight per token, at the measured matmul peak) is reported beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import QUESTIONS, matmul_peak, question_texts, table, write_result

NAME = "llm"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- bandwidth


def memory_bandwidth(nbytes: int, reps: int, device: str) -> dict[str, Any]:
    """Best-of-``reps`` bandwidth of a buffer copy (read + write counted) and of a sum (read)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    best_copy = best_read = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        _sync(device)
        best_read = min(best_read, time.perf_counter() - t)
    del src, dst
    return {
        "buffer_bytes": n * 4,
        "copy_gb_s": 2 * n * 4 / best_copy / 1e9,
        "read_gb_s": n * 4 / best_read / 1e9,
        "reps": reps,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }


def gemv_bandwidth(
    nbytes: int, cols: int, batch: int, reps: int, device: str, dtype: torch.dtype
) -> float:
    """GB/s at which ``linear(x[batch, cols], W)`` streams a ``nbytes`` weight matrix: what a
    decode step's matmuls get (on CPU, BLAS matrix-vector products often stream far below copy
    bandwidth)."""
    w = torch.randn(max(1, nbytes // (cols * torch.finfo(dtype).bits // 8)), cols, dtype=dtype)
    w = w.to(device)
    x = torch.randn(batch, cols, dtype=dtype, device=device)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return w.numel() * w.element_size() / best / 1e9


# --------------------------------------------------------------------------- model facts


def weight_facts(model: Any) -> dict[str, Any]:
    """Bytes a decode step reads from the weights, and the KV-cache bytes per token of context.

    ``model`` is a transformers causal LM (``get_input_embeddings``, ``config``).
    """
    params = list(model.parameters())  # tied weights appear once
    total = sum(p.numel() * p.element_size() for p in params)
    n_params = sum(p.numel() for p in params)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    emb_bytes = emb.numel() * emb.element_size()
    # Tied: the LM head reads the whole embedding matrix every step (the input lookup reads only
    # one row per sequence). Untied: the input embedding matrix is not read, only looked up.
    step_bytes = total if tied else total - emb_bytes
    cfg = model.config
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    kv_per_token = 2 * int(cfg.num_hidden_layers) * n_kv * head_dim * emb.element_size()
    return {
        "params": n_params,
        "param_bytes": total,
        "dtype": str(emb.dtype).removeprefix("torch."),
        "tied_embeddings": tied,
        "embedding_bytes": emb_bytes,
        "weight_bytes_per_step": step_bytes,
        "kv_bytes_per_token_of_context": kv_per_token,
        "layers": int(cfg.num_hidden_layers),
        "kv_heads": n_kv,
        "head_dim": head_dim,
    }


# --------------------------------------------------------------------------- timing


@torch.inference_mode()
def time_generate(gen: Any, texts: list[str], new_tokens: int) -> tuple[float, int]:
    """Seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens; the prompt length."""
    enc = gen.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
        gen.device
    )
    _sync(gen.device)
    t = time.perf_counter()
    out = gen.model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=gen.tokenizer.pad_token_id,
    )
    _sync(gen.device)
    dt = time.perf_counter() - t
    produced = out.shape[1] - enc["input_ids"].shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens, asked for {new_tokens}")
    return dt, int(enc["input_ids"].shape[1])


@torch.inference_mode()
def time_forward_loop(gen: Any, texts: list[str], new_tokens: int) -> tuple[float, float]:
    """Greedy decoding with bare forward calls over the KV cache: (prefill s, s per step)."""
    model = gen.model
    enc = gen.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
        gen.device
    )
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    _sync(gen.device)
    t = time.perf_counter()
    out = model(
        input_ids=enc["input_ids"],
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
    )
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(gen.device)
    prefill = time.perf_counter() - t
    past = out.past_key_values
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(gen.device)
    return prefill, (time.perf_counter() - t) / max(1, new_tokens - 1)


def measure_batch(gen: Any, texts: list[str], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill, decode per step and tokens/s for one batch of prompts."""
    # Warm-up: the first calls of each shape pay one-time costs (seconds on CPU).
    for n in (2, 1, 1, 4):
        time_generate(gen, texts, n)
    time_forward_loop(gen, texts, 4)
    t1 = [time_generate(gen, texts, 1)[0] for _ in range(repeats)]
    tn_and_len = [time_generate(gen, texts, new_tokens) for _ in range(repeats)]
    tn = [t for t, _ in tn_and_len]
    prompt_len = tn_and_len[0][1]
    ttft = statistics.median(t1)
    total = statistics.median(tn)
    step = (total - ttft) / (new_tokens - 1)
    loop = [time_forward_loop(gen, texts, new_tokens) for _ in range(repeats)]
    loop_step = statistics.median(s for _, s in loop)
    b = len(texts)
    return {
        "batch": b,
        "prompt_tokens_padded": prompt_len,
        "new_tokens": new_tokens,
        "ttft_s": ttft,
        "generate_s": total,
        "decode_step_s": step,
        "decode_tokens_per_s": b / step,
        "end_to_end_tokens_per_s": b * new_tokens / total,
        "forward_loop_prefill_s": statistics.median(p for p, _ in loop),
        "forward_loop_step_s": loop_step,
        "forward_loop_tokens_per_s": b / loop_step,
        "generate_overhead_per_step_s": step - loop_step,
        "repeats": repeats,
    }


def bounds(
    facts: dict[str, Any],
    bw: dict[str, Any],
    peak_gflops: float,
    gemv_gb_s: float,
    batch: int,
    context: float,
) -> dict[str, Any]:
    """Upper bounds on decode tokens/s for ``batch`` sequences at mean ``context`` tokens."""
    step_bytes = (
        facts["weight_bytes_per_step"] + batch * context * facts["kv_bytes_per_token_of_context"]
    )
    mem_s = step_bytes / (bw["copy_gb_s"] * 1e9)
    mem_read_s = step_bytes / (bw["read_gb_s"] * 1e9)
    flops = 2.0 * facts["params"] * batch  # every weight: one multiply-add per token
    compute_s = flops / (peak_gflops * 1e9)
    return {
        "bytes_per_step": step_bytes,
        "memory_bound_tokens_per_s": batch / mem_s,
        "memory_bound_read_bw_tokens_per_s": batch / mem_read_s,
        "compute_bound_tokens_per_s": batch / compute_s,
        "bound_tokens_per_s": batch / max(mem_s, compute_s),
        "limited_by": "memory" if mem_s >= compute_s else "compute",
        # what the weights stream at through this machine's BLAS linear() at this batch size
        "gemv_gb_s": gemv_gb_s,
        "gemv_bound_tokens_per_s": batch / (step_bytes / (gemv_gb_s * 1e9)),
    }


# --------------------------------------------------------------------------- report


def _row(r: dict[str, Any]) -> list[object]:
    b = r["bound"]
    return [
        r["batch"], r["prompt_tokens_padded"], f"{r['ttft_s'] * 1000:.0f}",
        f"{r['decode_step_s'] * 1000:.1f}", f"{r['decode_tokens_per_s']:.1f}",
        f"{r['forward_loop_tokens_per_s']:.1f}",
        f"{b['bound_tokens_per_s']:.1f} ({b['limited_by']})", f"{r['fraction_of_bound']:.0%}",
        f"{b['gemv_gb_s']:.1f}", f"{b['gemv_bound_tokens_per_s']:.1f}",
    ]  # fmt: skip


def to_markdown(res: dict[str, Any]) -> str:
    f, bw = res["model"], res["bandwidth"]
    intro = (
        f"{f['params'] / 1e6:.1f}M parameters, {f['weight_bytes_per_step'] / 1e6:.0f} MB read per "
        f"decode step (tied embeddings: {f['tied_embeddings']}), KV cache "
        f"{f['kv_bytes_per_token_of_context'] / 1024:.0f} KiB per token of context. "
        f"Bandwidth: copy {bw['copy_gb_s']:.1f} GB/s (read + write), read {bw['read_gb_s']:.1f} "
        f"GB/s; matmul peak {res['peak']['gflops']:.0f} GFLOP/s; torch threads "
        f"{res['torch_threads']}."
    )
    head = ["batch", "prompt tok", "TTFT ms", "decode ms/step", "decode tok/s"]
    head += ["forward-loop tok/s", "bound tok/s", "achieved / bound", "linear() GB/s"]
    head += ["linear()-bound tok/s"]
    rows = [_row(r) for r in res["batches"]]
    title = f"# LLM decode vs memory bandwidth ({res['llm']}, {f['dtype']}, {res['device']})"
    return "\n".join([title, "", intro, "", *table(head, rows), "", f"Bound: {res['bound']}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth-mib", type=int, default=1024)
    ap.add_argument("--bandwidth-reps", type=int, default=5)
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--dtype", help="override GAINRAG_LLM__DTYPE (float32, bfloat16, float16)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, two repeats")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 2
        args.bandwidth_mib, args.bandwidth_reps, args.peak_sizes = 256, 3, [1024]
    started = time.perf_counter()

    from gainrag.config import Settings
    from gainrag.llm.prompts import pseudo_prompt
    from gainrag.weights import prepare_llm
    from gainrag.wiring import build_generator as _build_generator

    if args.dtype:
        os.environ["GAINRAG_LLM__DTYPE"] = args.dtype
    settings = Settings()
    llm = settings.llm
    if llm.threads > 0:  # as build_components does
        torch.set_num_threads(llm.threads)
    gen: Any = _build_generator(settings, prepare_llm(llm.model, llm.models_dir))
    device = str(gen.device)
    facts = weight_facts(gen.model)
    bw = memory_bandwidth(args.bandwidth_mib << 20, args.bandwidth_reps, device)
    dtype = getattr(torch, facts["dtype"])
    peak = matmul_peak(args.peak_sizes, 5 if not args.quick else 3, device=device, dtype=dtype)

    questions = question_texts(args.questions, max(args.batch_sizes))
    batches: list[dict[str, Any]] = []
    for b in args.batch_sizes:
        texts = [gen.render(pseudo_prompt(q)) for q in questions[:b]]
        r = measure_batch(gen, texts, args.new_tokens, args.repeats)
        context = r["prompt_tokens_padded"] + args.new_tokens / 2
        gemv = gemv_bandwidth(
            min(args.bandwidth_mib, 256) << 20,
            int(gen.model.config.hidden_size),
            b,
            args.bandwidth_reps,
            device,
            dtype,
        )
        r["bound"] = bounds(facts, bw, peak["gflops"], gemv, b, context)
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["bound"]["bound_tokens_per_s"]
        r["fraction_of_memory_bound"] = (
            r["decode_tokens_per_s"] / r["bound"]["memory_bound_tokens_per_s"]
        )
        batches.append(r)
        print(
            f"batch {b}: {r['decode_tokens_per_s']:.1f} tok/s decode "
            f"({r['fraction_of_bound']:.0%} of bound)"
        )

    b1 = batches[0]
    eff_gb_s = facts["weight_bytes_per_step"] / b1["decode_step_s"] / 1e9
    bound = (
        f"memory bandwidth: each decode step reads all {facts['weight_bytes_per_step'] / 1e6:.0f} "
        f"MB of {facts['dtype']} weights; batch {b1['batch']} decodes at "
        f"{b1['fraction_of_bound']:.0%} of the {bw['copy_gb_s']:.1f} GB/s copy-bandwidth bound "
        f"(weights stream at {eff_gb_s:.1f} GB/s effective). The gap is the BLAS "
        f"matrix-vector products themselves: linear() on a large weight streams at "
        f"{b1['bound']['gemv_gb_s']:.1f} GB/s here; generate's own per-step overhead is "
        f"{b1['generate_overhead_per_step_s'] * 1000:.1f} ms of a "
        f"{b1['decode_step_s'] * 1000:.1f} ms step; KV-cache reads are "
        f"{b1['bound']['bytes_per_step'] / facts['weight_bytes_per_step'] - 1:.1%} of the bytes"
    )
    results: dict[str, Any] = {
        "target": "decode tokens/s against the memory-bandwidth bound (report the fraction)",
        "met": None,
        "bound": bound,
        "llm": llm.model,
        "generator_version": gen.version,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "model": facts,
        "bandwidth": bw,
        "peak": peak,
        "batches": batches,
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - started,
    }
    notes = [
        "Prompts: the pseudo-passage prompt (chat template applied) of the first nq_dev "
        "questions; batches are left-padded as the service does.",
        "Decode per step = (T(N new tokens) - T(1 new token)) / (N - 1) with greedy generate "
        "and min_new_tokens = N (EOS suppressed so that every run decodes N tokens; the logits "
        "processor this adds costs microseconds).",
        "forward_loop: the same greedy decoding with bare model(...) calls over the KV cache; "
        "generate_overhead_per_step_s = generate's step - the bare step.",
        "Bandwidth: copy counts read + write bytes (2 x buffer); sum counts the buffer once "
        "(read only). A decode step only reads weights, so the read figure is the optimistic one.",
        "Bound per step = max(memory: (weight bytes + batch x mean context x KV bytes/token) / "
        "copy bandwidth, compute: 2 x params x batch / matmul peak).",
    ]
    if args.quick:
        notes.append("--quick: 16 new tokens, two repeats; figures are noisy.")
    write_result(NAME, results, notes=notes, markdown=to_markdown(results))


if __name__ == "__main__":
    main()
