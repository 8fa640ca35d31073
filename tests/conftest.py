"""Shared fixtures: real models (bundled encoder, SmolLM2 converted once) and a small real index.

Everything here is loaded once per session; async tests share one event loop (pyproject) because
the components' batchers live on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process a test starts answers with the small plumbing model unless the test picks another:
# the default reader (1.1 GB) is for serving, evaluation and benchmarks, not for unit tests.
os.environ.setdefault("GAINRAG_LLM__MODEL", "smollm2-135m")
# The pseudo-passage is off by default (docs/evaluation.md); the tests keep it on so that every
# path of the pipeline (pipelined selection, caching, fallbacks, streaming) runs with it.
os.environ.setdefault("GAINRAG_PIPELINE__PSEUDO_PASSAGE", "true")
# The shipped default mixes the retriever's score into the ranking (0.5); the tests rank by the
# selector alone so that their expected orders are the selector's (and the pseudo-passage, whose
# retrieval part is 0, can still win); tests of the mix set the weight themselves.
os.environ.setdefault("GAINRAG_PIPELINE__RETRIEVAL_WEIGHT", "0")
# The shipped selector runtime is `auto`: a parity-and-speed check of OpenVINO against torch at
# the first start on a machine (~20 s, then cached; tests/test_selector_runtime.py covers it).
# Every other test, and every process a test starts, scores with torch: on a fresh machine the
# first worker of the suite would otherwise pay that check (and the model conversion) at its start.
os.environ.setdefault("GAINRAG_SELECTOR__RUNTIME", "torch")

from gainrag.config import REPO_ROOT, Settings
from gainrag.keys import KeyRecord, append_key, hash_key, new_key
from gainrag.pipeline import Components
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import build_index
from gainrag.weights import prepare_llm, resolve_encoder
from gainrag.wiring import build_components
from gainrag_harness import DEPENDENCIES, Service, deployment, running

DATA = REPO_ROOT / "data"

# Fixtures that start child processes (redis-server, llama-server, gainrag's gateway and workers,
# a browser): a test that uses one is marked `servers`, and `make test-quick` leaves it out. A
# test that starts a process itself carries the mark by hand; under GAINRAG_TESTS_QUICK=1 (make
# test-quick) the harness refuses to start one, so a missing mark fails loudly instead of slowing
# the quick loop down.
SERVER_FIXTURES = frozenset(
    {"stack", "llm_server", "redis_server", "server", "engine", "service_url", "gateway", "sdk",
     "processes", "browser", "worker"}
)  # fmt: skip


# Modules that compute with real models beyond a smoke test (numerical parity over real
# candidates, training runs, signal jobs): marked `models`, also left out of `make test-quick`.
MODEL_MODULES = frozenset(
    {"test_dtype", "test_selector_runtime", "test_gain", "test_gain_shards", "test_radio_dro",
     "test_selector_train", "test_training_data", "test_shipped_selector"}
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rsplit(".", 1)[-1] in MODEL_MODULES:
            item.add_marker(pytest.mark.models)


if os.environ.get("GAINRAG_TESTS_QUICK") == "1":

    def _refuse(self: Service) -> Service:
        raise RuntimeError(
            f"this test starts {self.name} (a child process): mark it `servers` "
            "(tests/conftest.py), make test-quick runs none"
        )

    Service.launch = _refuse  # type: ignore[method-assign]
N_DEV = 8  # dev questions whose gold passages are in the small corpus
N_OTHER = 240  # plus this many other passages


@pytest.fixture(scope="session")
def dev_questions() -> list[dict]:
    with (DATA / "questions" / "nq_dev.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(N_DEV), f, strict=False)]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, dev_questions: list[dict]) -> Path:
    gold = {g for q in dev_questions for g in q["gold_ids"]}
    rows, others = [], 0
    with (DATA / "corpus.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if row["id"] in gold:
                rows.append(row)
            elif others < N_OTHER:
                rows.append(row)
                others += 1
    assert {r["id"] for r in rows} >= gold
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def encoder() -> BiEncoder:
    return BiEncoder(resolve_encoder("all-MiniLM-L6-v2"), name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def index_dir(
    tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, encoder: BiEncoder
) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(small_corpus, out, encoder, show_progress=False)
    return out


@pytest.fixture(scope="session")
def llm_dir() -> Path:
    # Reuses the machine's converted-model cache (made by `make run` or the first test run).
    return prepare_llm("smollm2-135m", Settings().llm.models_dir)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    index_dir: Path,
    llm_dir: Path,
) -> Iterator[dict[str, Service]]:
    """The distributed deployment as real processes on loopback (redis, llm, retriever, selector,
    gateway), once per module, the gateway configured by the module's ``GATEWAY_ENV``."""
    logs = tmp_path_factory.mktemp("stack")
    services = deployment(logs, index_dir, request.module.GATEWAY_ENV)
    # The dependencies load side by side (start-up is most of such a test's fixed cost).
    with running(services, order=DEPENDENCIES):
        yield services


def make_settings(index_dir: Path, small_corpus: Path, **overrides: object) -> Settings:
    """Settings for tests: the small index, k=10, short generations, fp32 torch models (the
    exactness tests compare against fp32 references on any machine; tests/test_dtype.py covers
    auto, tests/test_selector_runtime.py the OpenVINO selector), the in-process transformers LLM
    (tests/test_llama_engine.py covers the managed llama.cpp one)."""
    base: dict[str, object] = {
        "retrieval": {"index_dir": index_dir, "corpus": small_corpus, "k": 10, "dtype": "float32"},
        "selector": {"dtype": "float32", "runtime": "torch"},
        "llm": {
            "backend": "transformers",
            "model": "smollm2-135m",  # the llm_dir fixture's model, whatever the default reader
            "max_new_tokens_pseudo": 24,
            "max_new_tokens_answer": 12,
            "dtype": "float32",
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}  # type: ignore[dict-item]
        else:
            base[key] = value
    return Settings(**base)  # type: ignore[arg-type]


def keys_file(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, str]:
    """A fresh API keys file holding one key named ``name``: (its path, the plain key)."""
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    plain = new_key()
    append_key(path, KeyRecord(name=name, sha256=hash_key(plain)))
    return path, plain


def keyed_gateway_env(
    index_dir: Path, small_corpus: Path, keys: Path, *, pseudo_tokens: int, answer_tokens: int
) -> dict[str, str]:
    """Environment of a real gateway process in tests: the small index (k = 5), in-process
    SmolLM2 (its generated-token counter is observable; not the default reader), API keys on."""
    return {
        "GAINRAG_LOG_LEVEL": "WARNING",
        "GAINRAG_LLM__BACKEND": "transformers",
        "GAINRAG_LLM__MODEL": "smollm2-135m",
        "GAINRAG_RETRIEVAL__INDEX_DIR": str(index_dir),
        "GAINRAG_RETRIEVAL__CORPUS": str(small_corpus),
        "GAINRAG_RETRIEVAL__K": "5",
        "GAINRAG_SELECTOR__RUNTIME": "torch",  # plumbing: no OpenVINO check at each start
        "GAINRAG_LLM__MAX_NEW_TOKENS_PSEUDO": str(pseudo_tokens),
        "GAINRAG_LLM__MAX_NEW_TOKENS_ANSWER": str(answer_tokens),
        "GAINRAG_API__KEYS_FILE": str(keys),
    }


@pytest.fixture(scope="session")
def settings(index_dir: Path, small_corpus: Path, llm_dir: Path) -> Settings:
    return make_settings(index_dir, small_corpus)


@pytest.fixture(scope="session")
async def components(settings: Settings) -> AsyncIterator[Components]:
    comps = build_components(settings)
    yield comps
    await comps.close()
