"""The cross-encoder on OpenVINO's CPU runtime, and the run-time choice between it and torch.

Why a second runtime: on two CPU cores torch runs the MiniLM cross-encoder's softmax, GELU and
LayerNorm as separate ops between small GEMMs; OpenVINO fuses them and picks its own kernels
(bf16 on AVX512-BF16/AMX, f32 elsewhere). Measured on real dev candidates
(benchmarks/results/selector_runtime.md): faster than torch at the same precision, with the
same top-1. ONNX Runtime was measured too; its dynamic int8 lost the top-1 on ~10% of questions.

``runtime = auto`` takes OpenVINO only where it is installed, the device is a CPU, and a check on
this machine passes: on a probe of real dev candidates (``PROBE``: 50 dev questions x their top 32
retrieved passages) its scores must keep torch float32's top-1 for ``MIN_TOP1`` of the questions
and a Spearman of at least ``MIN_SPEARMAN`` with it on every question, and it must score faster
than torch at the dtype torch would use. The float32 reference logits of the shipped checkpoint
are in the probe file (computed on any other checkpoint at the first start). The check takes
~20 s once per checkpoint, precision, OpenVINO version and CPU; its outcome is cached in
``CACHE``. Torch stays the path for training and GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gainrag.config import REPO_ROOT
from gainrag.hardware import cpu_features

log = logging.getLogger(__name__)

Precision = Literal["bf16", "f32"]
PROBE = REPO_ROOT / "models" / "selector" / "probe.jsonl"
CACHE = Path(os.environ.get("GAINRAG_SELECTOR_RUNTIME_CACHE", "~/.cache/gainrag/selector-runtime"))
MIN_TOP1 = 0.98  # of the probe's questions (50: one may swap its top-1, as bf16 near-ties do)
MIN_SPEARMAN = 0.99  # every question's
SPEED_QUESTIONS = 8


def available() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def precision_for(dtype: str) -> Precision | None:
    """The OpenVINO precision for a ``selector.dtype`` setting (None: no OpenVINO equivalent)."""
    if dtype == "auto":
        return "bf16" if cpu_features().bf16 else "f32"
    return {"bfloat16": "bf16", "float32": "f32"}.get(dtype)  # type: ignore[return-value]


# What _convert produces: bump it when the conversion changes (inputs, shapes, precision), so a
# machine's cached IR of the same checkpoint is not reused for the new conversion.
CONVERSION = 1


def ir_path(version: str) -> Path:
    """Where the converted model (IR) of checkpoint ``version`` is cached: keyed by everything
    the conversion's output depends on (the weights, this module's conversion, OpenVINO, and
    the torch and transformers that trace the model)."""
    import openvino as ov
    import torch
    import transformers

    tools = f"ov{ov.__version__}-torch{torch.__version__}-tf{transformers.__version__}"
    tools = tools.replace("/", "_")  # OpenVINO's version names its release branch: a/b
    return CACHE.expanduser() / "ir" / f"{version}-c{CONVERSION}-{tools}" / "model.xml"


class OpenVINOModel:
    """A sequence-classification checkpoint compiled for OpenVINO's CPU plugin; one logit each.

    The model is converted from the torch checkpoint in float32 once and the IR cached under
    ``CACHE`` (:func:`ir_path`; conversion traces the model: ~5 s); ``precision`` is the
    plugin's inference precision (``bf16``: its bf16 kernels, f32 accumulation).
    """

    def __init__(self, path: Path, version: str, precision: Precision, threads: int) -> None:
        import openvino as ov

        self.precision = precision
        core = ov.Core()
        ir = ir_path(version)
        model: Any = None
        if not ir.exists():
            model = _convert(path)
            try:
                ir.parent.mkdir(parents=True, exist_ok=True)
                tmp = ir.with_name(f"tmp-{os.getpid()}.xml")
                ov.save_model(model, tmp, compress_to_fp16=False)
                tmp.with_suffix(".bin").rename(ir.with_suffix(".bin"))
                tmp.rename(ir)  # the .xml last: its presence means the pair is complete
            except OSError as exc:  # a read-only home: convert at every start instead
                log.warning("selector runtime: cannot cache the converted model (%s)", exc)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        source = model if model is not None else core.read_model(ir)
        self.compiled = core.compile_model(source, "CPU", config)
        self.names = [p.get_any_name() for p in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def logits(self, batch: dict[str, np.ndarray]) -> list[float]:
        """One float32 logit per row of a padded batch (numpy int64 inputs)."""
        inputs = {n: batch[n].astype(np.int64) for n in self.names}
        out = self.request.infer(inputs)[self.output]
        return [float(x) for x in np.asarray(out, dtype=np.float32).reshape(-1)]


def _convert(path: Path) -> Any:
    """The checkpoint as an OpenVINO model (float32 weights, dynamic batch and length)."""
    import openvino as ov
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # eager attention: the traced graph is plain matmuls and softmax, which OpenVINO fuses
    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", torch_dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(path)
    example = dict(tok(["a question"] * 2, ["a passage", "another passage"], return_tensors="pt"))
    with torch.inference_mode():
        return ov.convert_model(model, example_input=example)


# --------------------------------------------------------------------------- the choice

Pair = tuple[str, str]
Scorer = Callable[[list[Pair]], list[float]]


@dataclass(frozen=True)
class RuntimeCheck:
    """OpenVINO against torch float32 on the probe, and both runtimes' speed."""

    precision: str
    questions: int
    top1: float  # fraction of questions whose top candidate is the same
    spearman_min: float
    spearman_mean: float
    openvino_pairs_per_s: float
    torch_pairs_per_s: float
    torch_dtype: str

    @property
    def passed(self) -> bool:
        """Rankings kept and faster than torch."""
        return (
            self.top1 >= MIN_TOP1
            and self.spearman_min >= MIN_SPEARMAN
            and self.openvino_pairs_per_s > self.torch_pairs_per_s
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"openvino {self.precision} vs torch float32 on {self.questions} probe questions: "
            f"top-1 kept {self.top1:.0%}, Spearman min {self.spearman_min:.4f}; "
            f"{self.openvino_pairs_per_s:.0f} pairs/s vs torch {self.torch_dtype} "
            f"{self.torch_pairs_per_s:.0f}"
        )


@dataclass(frozen=True)
class Probe:
    """Real dev candidates and, per checkpoint and max length, torch float32's logits."""

    questions: list[tuple[str, list[str]]]
    references: dict[str, list[list[float]]]  # reference_key -> one list of logits a question


def reference_key(version: str, max_length: int) -> str:
    """Which float32 reference fits a scorer: the checkpoint's version and its max length."""
    return f"{version}-len{max_length}"


def probe_path(checkpoint: Path) -> Path:
    """The probe beside the checkpoint's directory (``models/selector/probe.jsonl`` next to
    ``models/selector/<name>/``), where an installed package (an image) has it; else the
    repository's."""
    beside = checkpoint.parent / PROBE.name
    return beside if beside.is_file() else PROBE


def load_probe(path: Path = PROBE) -> Probe:
    """The probe file: one JSON row a question (``question``, ``candidates``, ``fp32``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = set.intersection(*(set(r.get("fp32", {})) for r in rows)) if rows else set()
    return Probe(
        [(r["question"], list(r["candidates"])) for r in rows],
        {k: [list(r["fp32"][k]) for r in rows] for k in keys},
    )


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties broken by position; fp logits rarely tie)."""
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(
    questions: list[tuple[str, list[str]]],
    reference: list[list[float]],
    candidate: Scorer,
    torch_served: Scorer,
    precision: str,
    torch_dtype: str,
    speed_questions: int = SPEED_QUESTIONS,
) -> RuntimeCheck:
    """Score every probe question with ``candidate`` against ``reference`` (torch float32's
    logits), and time both runtimes on the first ``speed_questions`` (one call a question, as a
    request would)."""

    def timed(scorer: Scorer, qs: list[tuple[str, list[str]]]) -> list[tuple[list[float], float]]:
        """Each question's scores and seconds, after a warm-up call (first calls allocate)."""
        scorer([(qs[0][0], qs[0][1][0])])
        out = []
        for q, docs in qs:
            start = time.perf_counter()
            out.append((scorer([(q, d) for d in docs]), time.perf_counter() - start))
        return out

    pairs = sum(len(d) for _, d in questions[:speed_questions])
    runs = timed(candidate, questions)  # the parity pass; its first questions are the timing
    got = [scores for scores, _ in runs]
    ov_s = sum(secs for _, secs in runs[:speed_questions])
    torch_s = sum(secs for _, secs in timed(torch_served, questions[:speed_questions]))
    rhos = [spearman(a, b) for a, b in zip(reference, got, strict=True)]
    same = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(reference, got, strict=True)]
    return RuntimeCheck(
        precision=precision,
        questions=len(questions),
        top1=sum(same) / len(same),
        spearman_min=min(rhos),
        spearman_mean=sum(rhos) / len(rhos),
        openvino_pairs_per_s=pairs / ov_s,
        torch_pairs_per_s=pairs / torch_s,
        torch_dtype=torch_dtype,
    )


def check_key(version: str, precision: str, threads: int, max_length: int) -> str:
    """What the check's outcome depends on: weights, length, precision, runtime, CPU, threads."""
    f = cpu_features()
    raw = (
        f"{version}|{max_length}|{precision}|{available()}|c{CONVERSION}|{f.model}|"
        f"{sorted(f.flags)}|{threads}"
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cached_check(key: str, run: Callable[[], RuntimeCheck]) -> RuntimeCheck:
    """The check's outcome from ``CACHE``, or ``run()`` saved there."""
    path = CACHE.expanduser() / f"check-{key}.json"
    try:
        return RuntimeCheck(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    result = run()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.__dict__, indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:  # a read-only home: the check runs again at the next start
        log.warning("selector runtime: cannot cache the check's outcome (%s)", exc)
    return result
