"""Which torch dtype a model runs in on this machine: ``auto`` resolved once per process.

- CUDA: float16 (tensor cores; bfloat16 only when configured explicitly).
- CPU: bfloat16 when the CPU has native bf16 matmul instructions (AMX-BF16 or AVX512-BF16, or
  the aarch64 ``bf16`` feature) *and* a start-up micro-benchmark of the model's own matmul shapes
  shows bf16 at least ``MIN_SPEEDUP`` times faster than float32 on every shape; float32 otherwise.

Flags alone are not enough: on a Zen 5 EPYC (avx512_bf16, no AMX) torch 2.13's bf16 ``linear`` is
~4x faster than fp32 at 2048 rows but 10-70x *slower* at one row (a decode step at batch 1), so
the choice depends on the shapes a component runs. Measurements are cached per shape and thread
count for the life of the process; each choice is logged once with its measured ratios.
"""

from __future__ import annotations

import functools
import logging
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# bf16 must beat fp32 by this much: it costs ~3 significant digits, so a tie is not worth it,
# and a ratio measured under load on shared cores is noisy by ~10%.
MIN_SPEEDUP = 1.15
# /proc/cpuinfo names of native bf16 dot-product instructions (x86 "flags", aarch64 "Features").
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")

Shape = tuple[int, int, int]  # (rows M, in K, out N) of x[M, K] @ W[N, K]^T, i.e. nn.Linear


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for low-precision matmuls."""

    model: str
    flags: frozenset[str]
    capability: str  # torch.backends.cpu.get_cpu_capability(): the ATen kernels torch uses

    @property
    def amx(self) -> bool:
        """AMX tiles with bf16 (Intel Xeon since Sapphire Rapids)."""
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 matmul instructions (otherwise torch emulates bf16 through fp32)."""
        return any(f in self.flags for f in BF16_FLAGS)

    def describe(self) -> str:
        """One line for logs and result files."""
        have = [f for f in ("amx_tile", "amx_bf16", "avx512_bf16", "bf16") if f in self.flags]
        return f"{self.model} [{', '.join(have) or 'no bf16 flags'}; torch {self.capability}]"


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (read once)."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return CpuFeatures(model, flags, torch.backends.cpu.get_cpu_capability())


@dataclass(frozen=True)
class Speedup:
    """Median time of one ``linear`` of ``shape`` in float32 and in bfloat16."""

    shape: Shape
    fp32_ms: float
    bf16_ms: float

    @property
    def ratio(self) -> float:
        """How many times faster bf16 is (below 1: slower)."""
        return self.fp32_ms / self.bf16_ms

    def describe(self) -> str:
        """``2048x384x1536: 4.1x`` style."""
        m, k, n = self.shape
        return f"{m}x{k}x{n}: {self.ratio:.2f}x"


def measure_bf16_speedup(shape: Shape, *, reps: int = 7, budget_s: float = 0.3) -> Speedup:
    """Time fp32 and bf16 ``linear`` of ``shape`` alternately (so load affects both alike).

    At least 3 pairs, at most ``reps``, stopping early once ``budget_s`` is spent; medians, not
    minima, because the service will run under the same contention.
    """
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    pairs = ((x, w), (x.bfloat16(), w.bfloat16()))
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for a, b in pairs:  # warm-up: first calls pick kernels and allocate
            torch.nn.functional.linear(a, b)
        start = time.perf_counter()
        while len(times[0]) < reps and (
            len(times[0]) < 3 or time.perf_counter() - start < budget_s
        ):
            for (a, b), out in zip(pairs, times, strict=True):
                t = time.perf_counter()
                torch.nn.functional.linear(a, b)
                out.append(time.perf_counter() - t)
    return Speedup(shape, statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3)


_speedups: dict[tuple[Shape, int], Speedup] = {}
_speedup_lock = threading.Lock()


def cached_speedup(shape: Shape) -> Speedup:
    """``measure_bf16_speedup`` once per shape and torch thread count in this process."""
    key = (shape, torch.get_num_threads())
    with _speedup_lock:  # components may be built from several threads; measure one at a time
        if key not in _speedups:
            _speedups[key] = measure_bf16_speedup(shape)
        return _speedups[key]


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a component runs in, and why."""

    requested: str
    dtype: str
    device: str
    reason: str
    speedups: tuple[Speedup, ...] = field(default=())

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype object."""
        return DTYPES[self.dtype]


def choose_dtype(
    requested: str,
    device: str,
    shapes: Sequence[Shape],
    *,
    features: CpuFeatures | None = None,
    measure: Callable[[Shape], Speedup] = cached_speedup,
) -> DtypeChoice:
    """Resolve ``requested`` (``auto`` or a dtype name) for a model running ``shapes``.

    ``features`` and ``measure`` default to this machine; tests inject them.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; use auto or one of {sorted(DTYPES)}")
        return DtypeChoice(requested, requested, device, "configured")
    if device.startswith("cuda"):
        return DtypeChoice(requested, "float16", device, "CUDA: fp16 tensor cores")
    if device != "cpu":
        return DtypeChoice(requested, "float32", device, f"no auto rule for {device}")
    features = features or cpu_features()
    if not features.bf16:
        return DtypeChoice(
            requested,
            "float32",
            device,
            f"no AMX/AVX512-BF16 on {features.describe()}: bf16 would be emulated",
        )
    speedups = tuple(measure(s) for s in shapes)
    slowest = min(speedups, key=lambda s: s.ratio, default=None)
    measured = ", ".join(s.describe() for s in speedups)
    if slowest is not None and slowest.ratio >= MIN_SPEEDUP:
        return DtypeChoice(
            requested,
            "bfloat16",
            device,
            f"bf16 faster than fp32 on {features.describe()} ({measured})",
            speedups,
        )
    return DtypeChoice(
        requested,
        "float32",
        device,
        f"bf16 not >= {MIN_SPEEDUP}x fp32 on every shape on {features.describe()} "
        f"({measured or 'no shapes'})",
        speedups,
    )


def resolve_dtype(
    component: str, requested: str, device: str, shapes: Sequence[Shape]
) -> DtypeChoice:
    """``choose_dtype`` on this machine, logged (the start-up line that says what auto chose)."""
    choice = choose_dtype(requested, device, shapes)
    log.info(
        "%s dtype: %s (requested %s on %s): %s",
        component,
        choice.dtype,
        requested,
        device,
        choice.reason,
    )
    return choice


def linear_shapes(config: object, rows: Sequence[int]) -> list[Shape]:
    """A transformer config's FFN up-projection at each of ``rows`` (the FFN's two matmuls
    hold ~2/3 of a layer's weights and FLOPs)."""
    hidden = int(getattr(config, "hidden_size"))  # noqa: B009 (configs are untyped)
    inner = int(getattr(config, "intermediate_size", 4 * hidden))
    return [(r, hidden, inner) for r in rows]
