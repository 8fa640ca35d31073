"""The llama.cpp that `make llm-venv` installs runs on this CPU: it was compiled for no instruction
this CPU lacks, and never with AMX, whose matmul crashes on Sapphire Rapids-class Xeons
(llama.cpp #20824; a native build there used to kill the server on its first completion)."""

from __future__ import annotations

import platform
import re
import subprocess

import pytest

from gainrag.config import REPO_ROOT
from gainrag.evaluation.machine import cpu_flags
from gainrag_harness import LLAMA_PYTHON, missing

# ggml's feature names (llama_print_system_info) -> the /proc/cpuinfo flag each one needs.
CPUINFO_FLAG = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}


def compiled_features() -> set[str]:
    """The CPU features the installed llama.cpp was compiled with ("X = 1" in its system info)."""
    if not LLAMA_PYTHON.exists():
        missing("llama-cpp-python's server", "`make llm-venv` builds it into .venv-llama")
    out = subprocess.run(
        [str(LLAMA_PYTHON), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return set(re.findall(r"([A-Z0-9_]+) = 1", out))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction sets only")
def test_llama_cpp_build_fits_this_cpu_and_has_no_amx() -> None:
    features = compiled_features()
    assert "AVX2" in features, features  # built with SIMD at all, not a scalar fallback
    assert "AMX_INT8" not in features
    flags = set(cpu_flags(tuple(CPUINFO_FLAG.values())))
    lacking = {f for f in features & CPUINFO_FLAG.keys() if CPUINFO_FLAG[f] not in flags}
    assert not lacking, f"llama.cpp uses instructions this CPU lacks: {sorted(lacking)}"
    # The installed wheel is the one built for this CPU's flag set (the stamp holds its key).
    key = subprocess.run(
        [str(REPO_ROOT / "scripts" / "llama-venv.sh"), "--key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stamp = (LLAMA_PYTHON.parent.parent / ".installed").read_text().strip()
    assert stamp == key, "the installed build is not the one for this CPU: run `make llm-venv`"
