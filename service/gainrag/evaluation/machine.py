"""What machine a measurement ran on (recorded with every benchmark and evaluation)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set extensions that change CPU inference speed (matmul kernels of torch and
# llama.cpp), in the names /proc/cpuinfo uses.
INFERENCE_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_flags(wanted: tuple[str, ...] = INFERENCE_FLAGS) -> list[str]:
    """Which of ``wanted`` the first CPU in /proc/cpuinfo has (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """CPU, its inference flags, core count, memory, OS, Python and torch versions."""
    import torch

    mem_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for a report header from :func:`machine_info` (older records lack the flags)."""
    gpu = "CUDA" if m.get("cuda") else "no GPU"
    line = f"{m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB, torch {m['torch']}, {gpu}"
    if "cpu_flags" in m:
        line += f"; CPU flags: {', '.join(m['cpu_flags']) or 'none of the listed'}"
    return line
