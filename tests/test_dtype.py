"""dtype = auto: the choice logic with injected CPU flags and timings, and bf16's accuracy against
fp32 on real dev questions and real candidates (valid on any x86 CPU: without native bf16 torch
emulates it, slower but with the same rounding).

Agreement thresholds (what bf16 must keep of fp32; measured values are in docs/hardware.md):

- selector: the fp32 top-1 for >= 98% of 50 questions (25 NQ + 25 SQuAD dev) x 20 candidates,
  and the *mean over questions* of the per-question Spearman rank correlation >= 0.99;
- bi-encoder: bf16 query vectors against the fp32 index: mean top-10 overlap >= 0.9 and the
  same top-1 for >= 95% of the questions;
- gain PPL (alpha 0.5, SmolLM2-135M): every contrastive PPL within 15% (relative) of fp32 and
  the same order of the gold and the other passage, on 3 real (question, passages, answers).
  Gold passages (PPL 2-55) move <= 3%; an off-topic one at PPL ~1000 moved 10%.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gainrag.config import REPO_ROOT, Settings
from gainrag.errors import ConfigurationError
from gainrag.evaluation.questions import passage_pool
from gainrag.hardware import (
    MIN_SPEEDUP,
    CpuFeatures,
    DtypeChoice,
    Shape,
    Speedup,
    choose_dtype,
    linear_shapes,
    measure_bf16_speedup,
)
from gainrag.llm.transformers_backend import TransformersGenerator
from gainrag.pipeline import Components
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import build_index
from gainrag.selector.cross_encoder import CrossEncoderScorer, CrossEncoderSelector
from gainrag.selector.openvino_runtime import spearman
from gainrag.training.gain import GainScorer
from gainrag.types import Passage
from gainrag.weights import resolve_encoder

DATA = REPO_ROOT / "data"
SELECTOR = REPO_ROOT / "models/selector/gainrag-minilm-l6"
N_PER_SET = 25  # questions from each of nq_dev and squad_dev
N_CANDIDATES = 20
N_POOL_OTHERS = 200  # corpus passages besides the questions' gold ones

AMX = CpuFeatures("Intel Xeon", frozenset({"avx512f", "amx_tile", "amx_bf16"}), "AVX512")
AVX512_BF16 = CpuFeatures("AMD EPYC", frozenset({"avx512f", "avx512_bf16"}), "AVX512")
NO_BF16 = CpuFeatures("old x86", frozenset({"avx2", "fma"}), "AVX2")
SHAPES: list[Shape] = [(1, 576, 1536), (8, 576, 1536)]


def fixed(*ratios: float) -> tuple[list[Shape], Callable[[Shape], Speedup]]:
    """A ``measure`` that returns ``ratios`` in turn, and the shapes it was asked for."""
    asked: list[Shape] = []
    it: Iterator[float] = iter(ratios)

    def measure(shape: Shape) -> Speedup:
        asked.append(shape)
        return Speedup(shape, fp32_ms=next(it), bf16_ms=1.0)

    return asked, measure


def never(shape: Shape) -> Speedup:
    raise AssertionError("no benchmark should run for this choice")


# --------------------------------------------------------------------------- choice logic


def test_amx_machine_chooses_bf16_when_it_measures_faster() -> None:
    asked, measure = fixed(6.0, 9.0)
    c = choose_dtype("auto", "cpu", SHAPES, features=AMX, measure=measure)
    assert c.dtype == "bfloat16" and c.torch_dtype == torch.bfloat16
    assert asked == SHAPES and [s.ratio for s in c.speedups] == [6.0, 9.0]
    assert "6.00x" in c.reason


def test_bf16_capable_but_slower_stays_fp32() -> None:
    _, measure = fixed(0.9, 0.95)
    c = choose_dtype("auto", "cpu", SHAPES, features=AVX512_BF16, measure=measure)
    assert c.dtype == "float32"


def test_bf16_must_win_on_every_shape() -> None:
    # the Zen 5 case: 4x at 2048 rows, 50x slower at one row (a batch-1 decode step)
    _, measure = fixed(0.02, 4.0)
    c = choose_dtype("auto", "cpu", SHAPES, features=AVX512_BF16, measure=measure)
    assert c.dtype == "float32" and "0.02x" in c.reason


def test_a_tie_is_not_worth_bf16() -> None:
    _, measure = fixed(MIN_SPEEDUP - 0.05)
    c = choose_dtype("auto", "cpu", SHAPES[:1], features=AMX, measure=measure)
    assert c.dtype == "float32"


def test_no_bf16_instructions_is_fp32_without_benchmarking() -> None:
    c = choose_dtype("auto", "cpu", SHAPES, features=NO_BF16, measure=never)
    assert c.dtype == "float32" and "emulated" in c.reason


def test_cuda_is_fp16_and_explicit_settings_win() -> None:
    assert choose_dtype("auto", "cuda", SHAPES, features=AMX, measure=never).dtype == "float16"
    for name in ("float32", "bfloat16", "float16"):
        for device in ("cpu", "cuda"):
            c = choose_dtype(name, device, SHAPES, features=NO_BF16, measure=never)
            assert c == DtypeChoice(name, name, device, "configured")
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int8", "cpu", SHAPES)


def test_cpu_feature_flags() -> None:
    assert AMX.amx and AMX.bf16 and not AVX512_BF16.amx and AVX512_BF16.bf16
    assert not NO_BF16.bf16 and "no bf16 flags" in NO_BF16.describe()


def test_micro_benchmark_and_shapes_of_a_real_config() -> None:
    s = measure_bf16_speedup((4, 32, 64), reps=3)
    assert s.fp32_ms > 0 and s.bf16_ms > 0 and s.ratio > 0
    cfg = BiEncoder(resolve_encoder("all-MiniLM-L6-v2")).model.config
    assert linear_shapes(cfg, [1, 2048]) == [(1, 384, 1536), (2048, 384, 1536)]


def test_auto_settings_reach_the_components(tmp_path: Path) -> None:
    s = Settings()
    assert (s.retrieval.dtype, s.selector.dtype, s.llm.dtype) == ("auto", "auto", "auto")
    sel = CrossEncoderScorer(SELECTOR, dtype="auto")
    assert sel.dtype.requested == "auto" and sel.dtype.dtype in ("float32", "bfloat16")
    assert next(sel.model.parameters()).dtype == sel.dtype.torch_dtype


# --------------------------------------------------------------------------- versions


async def test_versions_carry_the_resolved_dtype(tmp_path: Path, small_corpus: Path) -> None:
    sel = CrossEncoderSelector(SELECTOR, dtype="bfloat16")
    assert sel.version.endswith("-bfloat16")
    fp32 = CrossEncoderSelector(SELECTOR, dtype="float32")
    assert fp32.version.endswith("-float32") and fp32.version != sel.version
    await sel.close()
    await fp32.close()
    enc = BiEncoder(resolve_encoder("all-MiniLM-L6-v2"), name="all-MiniLM-L6-v2", dtype="bfloat16")
    assert enc.version == "all-MiniLM-L6-v2-bfloat16"
    # an index is never built from a bf16 encoder: its vectors must not depend on the machine
    with pytest.raises(ConfigurationError, match="float32"):
        build_index(small_corpus, tmp_path / "i", enc, show_progress=False)


# --------------------------------------------------------------------------- real candidates


def _questions() -> list[dict]:
    rows: list[dict] = []
    for name, step in (("nq_dev", 7), ("squad_dev", 20)):  # spread over articles
        with (DATA / "questions" / f"{name}.jsonl").open() as f:
            lines = f.readlines()
        rows += [json.loads(x) for x in lines[::step][:N_PER_SET]]
    return rows


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return _questions()


@pytest.fixture(scope="module")
def pool(questions: list[dict]) -> list[Passage]:
    """The questions' gold passages and ``N_POOL_OTHERS`` other corpus passages."""
    return passage_pool(DATA / "corpus.jsonl", questions, N_POOL_OTHERS)


@pytest.fixture(scope="module")
def pool_vectors(encoder: BiEncoder, pool: list[Passage]) -> np.ndarray:
    assert encoder.dtype.dtype == "float32"  # the index side, as build_index makes it
    return encoder.encode([p.as_candidate_text() for p in pool])


def test_bf16_selector_keeps_the_fp32_ranking(
    encoder: BiEncoder,
    questions: list[dict],
    pool: list[Passage],
    pool_vectors: np.ndarray,
) -> None:
    qv = encoder.encode([q["question"] for q in questions])
    top = np.argsort(-(qv @ pool_vectors.T), axis=1)[:, :N_CANDIDATES]
    pairs = [
        (q["question"], pool[j].as_candidate_text())
        for q, row in zip(questions, top, strict=True)
        for j in row
    ]
    ref = CrossEncoderScorer(SELECTOR, max_length=256, dtype="float32").score_pairs(pairs)
    low = CrossEncoderScorer(SELECTOR, max_length=256, dtype="bfloat16").score_pairs(pairs)
    same_top1, rhos = 0, []
    for i in range(len(questions)):
        a = ref[i * N_CANDIDATES : (i + 1) * N_CANDIDATES]
        b = low[i * N_CANDIDATES : (i + 1) * N_CANDIDATES]
        same_top1 += int(np.argmax(a) == np.argmax(b))
        rhos.append(spearman(a, b))
    agree = same_top1 / len(questions)
    diff = max(abs(x - y) for x, y in zip(ref, low, strict=True))
    print(
        f"selector bf16 vs fp32: top-1 {same_top1}/{len(questions)}, Spearman mean "
        f"{statistics.mean(rhos):.4f} min {min(rhos):.4f}, max |logit diff| {diff:.3f}"
    )
    assert agree >= 0.98
    assert statistics.mean(rhos) >= 0.99


def test_bf16_query_vectors_retrieve_what_fp32_does(
    encoder: BiEncoder, questions: list[dict], pool_vectors: np.ndarray
) -> None:
    low = BiEncoder(resolve_encoder("all-MiniLM-L6-v2"), dtype="bfloat16")
    texts = [q["question"] for q in questions]
    ref = np.argsort(-(encoder.encode(texts) @ pool_vectors.T), axis=1)[:, :10]
    got = np.argsort(-(low.encode(texts) @ pool_vectors.T), axis=1)[:, :10]
    overlap = statistics.mean(len(set(a) & set(b)) / 10 for a, b in zip(ref, got, strict=True))
    top1 = statistics.mean(float(a[0] == b[0]) for a, b in zip(ref, got, strict=True))
    print(f"bi-encoder bf16 vs fp32 queries: top-10 overlap {overlap:.3f}, top-1 {top1:.3f}")
    assert overlap >= 0.9 and top1 >= 0.95


def test_bf16_gain_ppls_are_close_to_fp32(
    components: Components, llm_dir: Path, questions: list[dict], pool: list[Passage]
) -> None:
    gen = components.generator
    assert isinstance(gen, TransformersGenerator) and gen.dtype.dtype == "float32"
    low = TransformersGenerator(llm_dir, dtype="bfloat16")
    assert low.version.endswith("-bfloat16")
    by_id = {p.id: p for p in pool}
    ref_scorer = GainScorer(gen.teacher_forced_scorer(batch_size=2))
    low_scorer = GainScorer(low.teacher_forced_scorer(batch_size=2))
    worst = 0.0
    for i, q in enumerate(questions[::12][:3]):
        gold = by_id[q["gold_ids"][0]]
        other = pool[(7 * i + 3) % len(pool)]  # some other real passage
        ref = ref_scorer.passage_ppls(q["question"], [gold, other], q["answers"], 0.5)
        got = low_scorer.passage_ppls(q["question"], [gold, other], q["answers"], 0.5)
        worst = max(worst, *(abs(g / r - 1) for g, r in zip(got, ref, strict=True)))
        assert (ref[0] < ref[1]) == (got[0] < got[1])
    print(f"gain PPL bf16 vs fp32: worst relative difference {worst:.4f}")
    assert worst <= 0.15
