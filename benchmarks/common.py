"""What every benchmark shares: starting services on loopback, timing helpers and the result
file format (``benchmarks/results/<name>.json``: the command, the machine, the figures, the
targets and what bounds each figure).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "service"))

from gainrag.evaluation.machine import machine_info  # noqa: E402
from gainrag.evaluation.qa_metrics import percentile  # noqa: E402

__all__ = [
    "RESULTS",
    "ROOT",
    "Server",
    "free_port",
    "load_questions",
    "matmul_peak",
    "pct",
    "percentile",
    "write_result",
]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_questions(path: Path, limit: int | None = None) -> list[str]:
    """The ``question`` field of a JSONL file."""
    with path.open() as f:
        qs = [json.loads(line)["question"] for line in f if line.strip()]
    return qs[:limit] if limit else qs


def pct(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of a sample (empty -> NaN-free zeros)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "n": 0}
    return {
        "p50": percentile(list(values), 50),
        "p95": percentile(list(values), 95),
        "p99": percentile(list(values), 99),
        "mean": sum(values) / len(values),
        "n": len(values),
    }


class Server:
    """A child process serving HTTP on loopback, waited on until ``probe`` answers 200."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        probe: str = "/ready",
        log: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.probe = probe
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def gainrag(cls, *sub: str, env: dict[str, str] | None = None, **kw: Any) -> Server:
        """``gainrag <sub> --host 127.0.0.1 --port <free>`` with this interpreter."""
        args = [sys.executable, "-m", "gainrag.cli", *sub, "--host", "127.0.0.1"]
        return cls([*args, "--port", "{port}"], env=env, **kw)

    def __enter__(self) -> Server:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.args[:4]} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + self.probe, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise SystemExit(f"{self.url} not ready after 600 s")

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def write_result(
    name: str,
    results: dict[str, Any],
    *,
    argv: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    markdown: str | None = None,
) -> Path:
    """Write ``benchmarks/results/<name>.json`` (+ ``.md`` if given) with command and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    report: dict[str, Any] = {
        "benchmark": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", str(script), *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "results": results,
        "notes": list(notes),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        machine = _machine_line(report["machine"])
        header = f"Command: `{report['command']}`  \nMachine: {machine}\n\n"
        (RESULTS / f"{name}.md").write_text(header + markdown.rstrip() + "\n")
    return path


def _machine_line(m: dict[str, Any]) -> str:
    gpu = ", CUDA" if m.get("cuda") else ", no GPU"
    return f"{m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB, torch {m['torch']}{gpu}"


def matmul_peak(
    sizes: list[int], reps: int, device: str = "cpu", dtype: Any = None
) -> dict[str, Any]:
    """Best-of-``reps`` GFLOP/s of ``torch.matmul`` on square matrices (FLOP = 2 n^3); the
    machine's measured peak that the selector and LLM benchmarks compare against."""
    import torch

    dtype = dtype or torch.float32
    per_size: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.matmul(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        per_size[str(n)] = 2.0 * n**3 / best / 1e9
        del a, b
    return {
        "gflops": max(per_size.values()),
        "per_size_gflops": per_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "reps": reps,
    }
