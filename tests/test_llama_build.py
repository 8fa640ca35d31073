"""The llama.cpp build (`make llm-engine`'s llama-server: the embedded default's engine, the test
suite's OpenAI-compatible server and the compose image's LLM) runs on this CPU: it was compiled
for no instruction this CPU lacks, and never with AMX, whose matmul crashes on Sapphire
Rapids-class Xeons (llama.cpp #20824; a native build there used to kill the server on its first
completion)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

from gainrag.config import REPO_ROOT, Settings
from gainrag.evaluation.machine import cpu_flags
from gainrag_harness import missing

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


def server_features(tmp_path: Path) -> set[str]:
    """The CPU features llama-server (`make llm-engine`) was compiled with, from the system info
    it prints before loading a model (a missing model: it prints, then exits)."""
    binary = Settings().llm.engine_bin
    if not os.access(binary, os.X_OK):
        missing("llama.cpp's llama-server", "`make llm-engine` builds it into var/llama-server")
    out = subprocess.run(
        [str(binary), "-v", "--model", str(tmp_path / "absent.gguf"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    info = [line for line in (out.stdout + out.stderr).splitlines() if "system_info" in line]
    assert info, out.stdout[-2000:] + out.stderr[-2000:]
    return set(re.findall(r"([A-Z0-9_]+) = 1", info[0]))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction sets only")
def test_llama_server_build_fits_this_cpu_and_has_no_amx(tmp_path: Path) -> None:
    features = server_features(tmp_path)
    assert "AVX2" in features, features
    assert not {f for f in features if f.startswith("AMX")}, features
    flags = set(cpu_flags(tuple(CPUINFO_FLAG.values())))
    lacking = {f for f in features & CPUINFO_FLAG.keys() if CPUINFO_FLAG[f] not in flags}
    assert not lacking, f"llama-server uses instructions this CPU lacks: {sorted(lacking)}"
    key = subprocess.run(
        [str(REPO_ROOT / "scripts" / "llama-server.sh"), "--key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    installed = (Settings().llm.engine_bin.parent / "KEY").read_text().strip()
    assert installed == key, "the installed llama-server is not the one for this CPU"


def test_the_flag_computation_for_an_avx2_cpu_never_turns_amx_on() -> None:
    """An AVX2-only CPU (e.g. AMD Zen 2) gets AVX2 and no AVX-512; AMX is off even when listed."""
    script = REPO_ROOT / "scripts" / "llama-flags.sh"
    flags = "fpu avx avx2 fma f16c bmi2 amx_tile amx_int8 amx_bf16 avx512f"  # no avx512bw etc.
    out = subprocess.run(
        ["bash", "-c", f'. "{script}"; echo "$LLAMA_CPU_KEY"; echo "${{LLAMA_CMAKE_FLAGS[*]}}"'],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LLAMA_CPUINFO_FLAGS": flags},
    ).stdout.splitlines()
    if platform.machine() == "x86_64":
        assert out[0] == "x86_64-AVX+AVX2+FMA+F16C+BMI2"
        assert "-DGGML_AVX512=OFF" in out[1] and "-DGGML_AVX2=ON" in out[1]
    for amx in ("TILE", "INT8", "BF16"):
        assert f"-DGGML_AMX_{amx}=OFF" in out[1]
        assert f"-DGGML_AMX_{amx}=ON" not in out[1]
