"""The selector on OpenVINO (``selector/openvino_runtime.py``): the same ranking as torch float32
on real dev candidates, the run-time choice and its cache, versions that name the runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gainrag.config import REPO_ROOT
from gainrag.errors import ConfigurationError
from gainrag.selector import openvino_runtime as ovr
from gainrag.selector.cross_encoder import CrossEncoderScorer, CrossEncoderSelector

SELECTOR = REPO_ROOT / "models/selector/gainrag-minilm-l6"
pytestmark = pytest.mark.skipif(ovr.available() is None, reason="openvino is not installed")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # one cache for the module: the converted model (IR) is shared, the checks are not
    old, ovr.CACHE = ovr.CACHE, tmp_path_factory.mktemp("runtime-cache")
    yield ovr.CACHE
    ovr.CACHE = old


@pytest.fixture(autouse=True)
def _no_cached_checks() -> None:
    for f in ovr.CACHE.glob("check-*.json"):
        f.unlink()


@pytest.fixture(scope="module")
def probe() -> list[tuple[str, list[str]]]:
    # a slice of the probe's real retrieved candidates (the whole is the run-time check's)
    rows = ovr.load_probe().questions
    assert len(rows) == 50 and all(len(c) == 32 for _, c in rows)
    return rows[::5]


@pytest.fixture(scope="module")
def reference() -> list[list[float]]:
    """torch float32's logits for the slice, as stored in the probe (checked just below)."""
    version = CrossEncoderScorer(SELECTOR, dtype="float32", runtime="torch").checkpoint_version
    return ovr.load_probe().references[ovr.reference_key(version, 512)][::5]


def test_the_probe_holds_the_shipped_checkpoints_float32_logits(
    probe: list[tuple[str, list[str]]], reference: list[list[float]]
) -> None:
    scorer = CrossEncoderScorer(SELECTOR, dtype="float32", runtime="torch")
    for (q, docs), stored in list(zip(probe, reference, strict=True))[:3]:
        ours = scorer.score_pairs([(q, d) for d in docs])
        assert np.max(np.abs(np.subtract(ours, stored))) < 1e-3  # fp32 on another CPU


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_openvino_keeps_the_torch_float32_ranking_of_real_candidates(
    dtype: str, probe: list[tuple[str, list[str]]], reference: list[list[float]]
) -> None:
    scorer = CrossEncoderScorer(SELECTOR, dtype=dtype, runtime="openvino")
    assert scorer.openvino is not None and scorer.model is None
    got = [scorer.score_pairs([(q, d) for d in docs]) for q, docs in probe]
    kept = [np.argmax(ours) == np.argmax(ref) for ref, ours in zip(reference, got, strict=True)]
    assert sum(kept) >= len(kept) - (dtype == "bfloat16")  # bf16 may swap one near-tie
    for ref, ours in zip(reference, got, strict=True):
        assert ovr.spearman(ref, ours) >= ovr.MIN_SPEARMAN
        # f32 is the same computation in another order; bf16 keeps ~3 digits of the logits
        tol = 1e-3 if dtype == "float32" else 0.15
        assert np.max(np.abs(np.subtract(ref, ours))) < tol
    # tokens are counted as torch's scorer counts them (the /rerank worker reports them)
    pairs = [(probe[0][0], d) for d in probe[0][1]]
    torch_scorer = CrossEncoderScorer(SELECTOR, dtype="float32", runtime="torch")
    assert scorer.score_pairs_counted(pairs)[1] == torch_scorer.score_pairs_counted(pairs)[1]


def test_auto_runs_the_check_once_and_records_why(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real, whole = ovr.compare, ovr.load_probe()
    # the real check on a tenth of the probe (the whole one is ~20 s on 2 cores)
    monkeypatch.setattr(
        ovr,
        "load_probe",
        lambda: ovr.Probe(whole.questions[::10], {k: v[::10] for k, v in whole.references.items()}),
    )

    def counted(*args: object, **kwargs: object) -> ovr.RuntimeCheck:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ovr, "compare", counted)
    first = CrossEncoderScorer(SELECTOR, runtime="auto")
    second = CrossEncoderScorer(SELECTOR, runtime="auto")
    assert calls == [1]  # the second start read the cached outcome
    assert first.variant == second.variant
    assert "on 5 probe questions" in first.runtime_reason  # what the check measured, for the log
    assert len(list(ovr.CACHE.glob("check-*.json"))) == 1


def test_without_stored_references_the_check_computes_float32_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = ovr.load_probe()
    seen: list[list[list[float]]] = []
    real = ovr.compare

    def spy(questions: object, reference: list[list[float]], *rest: object) -> ovr.RuntimeCheck:
        seen.append(reference)
        return real(questions, reference, *rest)  # type: ignore[arg-type]

    # a probe with no references for this checkpoint (as for a checkpoint of one's own)
    monkeypatch.setattr(ovr, "load_probe", lambda: ovr.Probe(whole.questions[::10], {}))
    monkeypatch.setattr(ovr, "compare", spy)
    CrossEncoderScorer(SELECTOR, runtime="auto")
    stored = whole.references[next(iter(whole.references))][::10]
    assert len(seen) == 1
    for ours, theirs in zip(seen[0], stored, strict=True):
        assert np.max(np.abs(np.subtract(ours, theirs))) < 1e-3  # torch float32, as stored


def test_a_failed_check_keeps_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = ovr.RuntimeCheck("bf16", 50, 1.0, 0.999, 0.999, 10.0, 100.0, "bfloat16")
    monkeypatch.setattr(ovr, "cached_check", lambda key, run: slow)
    scorer = CrossEncoderScorer(SELECTOR, runtime="auto")
    assert scorer.openvino is None and scorer.model is not None
    assert scorer.variant == scorer.dtype.dtype
    assert scorer.runtime_reason.startswith("torch: ")


@pytest.mark.parametrize(
    ("top1", "rho", "ov", "torch_", "passed"),
    [
        (1.0, 0.995, 150.0, 130.0, True),
        (49 / 50, 0.995, 150.0, 130.0, True),  # one near-tie swapped
        (48 / 50, 0.999, 150.0, 130.0, False),  # two top-1s lost
        (1.0, 0.98, 150.0, 130.0, False),  # ranking drifted
        (1.0, 0.999, 120.0, 130.0, False),  # not faster
    ],
)
def test_the_check_needs_the_same_top1_a_close_ranking_and_speed(
    top1: float, rho: float, ov: float, torch_: float, passed: bool
) -> None:
    check = ovr.RuntimeCheck("bf16", 50, top1, rho, rho, ov, torch_, "bfloat16")
    assert check.passed is passed


def test_cached_check_reads_what_it_wrote() -> None:
    made = ovr.RuntimeCheck("f32", 50, 1.0, 0.9999, 0.99995, 90.0, 50.0, "float32")
    runs: list[int] = []

    def run() -> ovr.RuntimeCheck:
        runs.append(1)
        return made

    assert ovr.cached_check("k", run) == made
    assert ovr.cached_check("k", run) == made
    assert runs == [1]


async def test_versions_name_the_runtime_and_a_non_default_length() -> None:
    sel = CrossEncoderSelector(SELECTOR, dtype="float32", runtime="openvino", max_length=256)
    torch_sel = CrossEncoderSelector(SELECTOR, dtype="float32", runtime="torch")
    try:
        assert sel.version.endswith("-openvino-f32-len256")
        assert torch_sel.version.endswith("-float32")  # unchanged: cached answers stay valid
        assert sel.version.split("-")[0] == torch_sel.version.split("-")[0]
    finally:
        await sel.close()
        await torch_sel.close()


def test_openvino_configured_without_the_package_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ovr, "available", lambda: None)
    with pytest.raises(ConfigurationError, match="openvino"):
        CrossEncoderScorer(SELECTOR, runtime="openvino")
    # auto falls back to torch and says why
    scorer = CrossEncoderScorer(SELECTOR, runtime="auto")
    assert scorer.openvino is None and "not installed" in scorer.runtime_reason


def test_an_unwritable_cache_costs_time_not_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(ovr, "CACHE", blocker / "cache")  # every mkdir under it fails
    made = ovr.RuntimeCheck("f32", 50, 1.0, 0.9999, 0.99995, 90.0, 50.0, "float32")
    assert ovr.cached_check("k", lambda: made) == made
    scorer = CrossEncoderScorer(SELECTOR, dtype="float32", runtime="openvino")
    assert len(scorer.score_pairs([("q", "a passage"), ("q", "another one")])) == 2
