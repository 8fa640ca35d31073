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
def torch_fp32() -> CrossEncoderScorer:
    """One torch float32 scorer for the tests that only read its scores (loading is ~1 s)."""
    return CrossEncoderScorer(SELECTOR, dtype="float32", runtime="torch")


@pytest.fixture(scope="module")
def reference(torch_fp32: CrossEncoderScorer) -> list[list[float]]:
    """torch float32's logits for the slice, as stored in the probe (checked just below)."""
    version = torch_fp32.checkpoint_version
    return ovr.load_probe().references[ovr.reference_key(version, 512)][::5]


@pytest.fixture(scope="module")
def torch_scored(
    torch_fp32: CrossEncoderScorer, probe: list[tuple[str, list[str]]]
) -> list[tuple[list[float], list[int]]]:
    """torch float32's logits and token counts on the slice's first 3 questions, computed once
    (torch float32 is the slowest scorer here, ~0.1 s a pair on 2 cores): the probe test checks
    the logits, the OpenVINO tests the token counts."""
    return [torch_fp32.score_pairs_counted([(q, d) for d in docs]) for q, docs in probe[:3]]


def test_the_probe_holds_the_shipped_checkpoints_float32_logits(
    torch_scored: list[tuple[list[float], list[int]]], reference: list[list[float]]
) -> None:
    for (ours, _), stored in zip(torch_scored, reference[:3], strict=True):
        assert np.max(np.abs(np.subtract(ours, stored))) < 1e-3  # fp32 on another CPU


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_openvino_keeps_the_torch_float32_ranking_of_real_candidates(
    dtype: str,
    probe: list[tuple[str, list[str]]],
    reference: list[list[float]],
    torch_scored: list[tuple[list[float], list[int]]],
) -> None:
    # The first of these converts the checkpoint (the module's cache starts empty): the strict
    # float32 tolerance below is also the check of a fresh conversion.
    scorer = CrossEncoderScorer(SELECTOR, dtype=dtype, runtime="openvino")
    assert scorer.openvino is not None and scorer.model is None
    counted = [scorer.score_pairs_counted([(q, d) for d in docs]) for q, docs in probe]
    got = [scores for scores, _ in counted]
    kept = [np.argmax(ours) == np.argmax(ref) for ref, ours in zip(reference, got, strict=True)]
    assert sum(kept) >= len(kept) - (dtype == "bfloat16")  # bf16 may swap one near-tie
    for ref, ours in zip(reference, got, strict=True):
        assert ovr.spearman(ref, ours) >= ovr.MIN_SPEARMAN
        # f32 is the same computation in another order; bf16 keeps ~3 digits of the logits
        tol = 1e-3 if dtype == "float32" else 0.15
        assert np.max(np.abs(np.subtract(ref, ours))) < tol
    # tokens are counted as torch's scorer counts them (the /rerank worker reports them)
    assert counted[0][1] == torch_scored[0][1]


def test_auto_runs_the_check_once_and_records_why(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real, whole = ovr.compare, ovr.load_probe()
    # The real check on 2 of the probe's questions (the whole one is ~20 s on 2 cores; this test
    # is about running it once and saying why, not about its statistics: that is the parity
    # test's, above).
    monkeypatch.setattr(
        ovr,
        "load_probe",
        lambda _path: ovr.Probe(
            whole.questions[::25], {k: v[::25] for k, v in whole.references.items()}
        ),
    )

    def counted(*args: object, **kwargs: object) -> ovr.RuntimeCheck:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ovr, "compare", counted)
    first = CrossEncoderScorer(SELECTOR, runtime="auto")
    second = CrossEncoderScorer(SELECTOR, runtime="auto")
    assert calls == [1]  # the second start read the cached outcome
    assert first.variant == second.variant
    assert "on 2 probe questions" in first.runtime_reason  # what the check measured, for the log
    assert len(list(ovr.CACHE.glob("check-*.json"))) == 1


def test_without_stored_references_the_check_computes_float32_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = ovr.load_probe()
    seen: list[list[list[float]]] = []

    def spy(questions: object, reference: list[list[float]], *rest: object) -> ovr.RuntimeCheck:
        # What the check was handed is the point here; its outcome is the test above's (the
        # real comparison would score these questions twice more, ~6 s on 2 cores).
        seen.append(reference)
        return ovr.RuntimeCheck("f32", 2, 1.0, 1.0, 1.0, 1.0, 2.0, "float32")  # a failed one

    # a probe with no references for this checkpoint (as for a checkpoint of one's own), on 2
    # questions: their float32 logits are this test's cost (torch float32, ~0.1 s a pair)
    monkeypatch.setattr(ovr, "load_probe", lambda _path: ovr.Probe(whole.questions[::25], {}))
    monkeypatch.setattr(ovr, "compare", spy)
    CrossEncoderScorer(SELECTOR, runtime="auto")
    stored = whole.references[next(iter(whole.references))][::25]
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


def test_the_converted_model_cache_names_the_conversion_and_its_tools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import openvino
    import torch

    first = ovr.ir_path("abc123")
    assert first.name == "model.xml" and first.parent.name.startswith("abc123-c")
    ov = openvino.__version__.replace("/", "_")  # one directory, whatever the version says
    assert f"ov{ov}" in first.parent.name and f"torch{torch.__version__}" in first.parent.name
    # a changed conversion, or a checkpoint of another version, is converted anew
    monkeypatch.setattr(ovr, "CONVERSION", ovr.CONVERSION + 1)
    assert ovr.ir_path("abc123") != first
    assert ovr.ir_path("def456") != ovr.ir_path("abc123")
    # and its run-time check is redone
    key = ovr.check_key("abc123", "bf16", 2, 512)
    monkeypatch.setattr(ovr, "CONVERSION", ovr.CONVERSION + 1)
    assert ovr.check_key("abc123", "bf16", 2, 512) != key


def test_the_probe_is_found_beside_the_checkpoint(tmp_path: Path) -> None:
    # an installed package (the images) has no repository around it: the probe travels with
    # the selector checkpoints (models/selector/probe.jsonl beside models/selector/<name>/)
    checkpoint = tmp_path / "selector" / "mine"
    checkpoint.mkdir(parents=True)
    assert ovr.probe_path(checkpoint) == ovr.PROBE
    (tmp_path / "selector" / "probe.jsonl").write_text(ovr.PROBE.read_text())
    assert ovr.probe_path(checkpoint) == tmp_path / "selector" / "probe.jsonl"
