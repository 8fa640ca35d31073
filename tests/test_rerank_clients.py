"""The selector worker's Cohere-compatible routes (``/v1/rerank``, ``/v2/rerank``) with the
official ``cohere`` SDK as a real client, against a real worker process: the order is the
worker's own ``/rerank`` order, the scores its logits through a sigmoid, and ``top_n``,
``return_documents``, ``max_tokens_per_doc``, the bearer token and errors behave as documented."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import cohere
import httpx
import pytest
from cohere.core.api_error import ApiError
from transformers import AutoTokenizer

from gainrag.config import Settings
from gainrag_harness import Service, gainrag_service, running
from tests.conftest import DATA

TOKEN = "worker-secret"
QUERY = "who got the first nobel prize in physics"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``gainrag worker selector`` with the shipped selector, one thread, a bearer token."""
    logs = tmp_path_factory.mktemp("rerank-worker")
    env = {"GAINRAG_WORKER__API_TOKEN": TOKEN, "GAINRAG_SELECTOR__DTYPE": "float32"}
    svc = gainrag_service("selector", ["worker", "selector"], logs, env, threads=1)
    with running({"selector": svc}):
        yield svc


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Twelve real corpus passages (title + the first 60 words)."""
    docs = []
    with (DATA / "corpus.jsonl").open() as f:
        for _, line in zip(range(12), f, strict=False):
            row = json.loads(line)
            docs.append(row["title"] + "\n" + " ".join(row["text"].split()[:60]))
    return docs


def _own_rerank(url: str, documents: list[str]) -> list[tuple[int, float]]:
    """The worker's own ``/rerank``: (index, logit), best first."""
    r = httpx.post(
        f"{url}/rerank",
        json={"query": QUERY, "documents": documents},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return [(x["index"], x["relevance_score"]) for x in r.json()["results"]]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_v2_rerank_with_the_official_sdk(worker: Service, documents: list[str]) -> None:
    own = _own_rerank(worker.url, documents)
    co = cohere.ClientV2(api_key=TOKEN, base_url=worker.url)
    got = co.rerank(model="gainrag", query=QUERY, documents=documents)
    assert [r.index for r in got.results] == [i for i, _ in own]
    for r, (_, logit) in zip(got.results, own, strict=True):
        assert r.relevance_score == pytest.approx(_sigmoid(logit), abs=1e-6)
        assert 0 <= r.relevance_score <= 1
    assert got.meta is not None and got.meta.api_version is not None
    assert got.meta.api_version.version == "2"
    assert got.meta.billed_units is not None and got.meta.billed_units.search_units == 1
    assert got.meta.tokens is not None and got.meta.tokens.input_tokens > len(documents) * 10
    assert got.id

    top = co.rerank(model="gainrag", query=QUERY, documents=documents, top_n=3)
    assert [r.index for r in top.results] == [i for i, _ in own[:3]]


def test_v2_max_tokens_per_doc_truncates_documents(worker: Service, documents: list[str]) -> None:
    # The same as reranking the documents cut after their first 8 tokens (exact characters).
    tok = AutoTokenizer.from_pretrained(Settings().selector.checkpoint)
    cut = []
    for d in documents:
        offsets = tok(d, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut.append(d[: offsets[7][1]])
    assert all(len(c) < len(d) for c, d in zip(cut, documents, strict=True))
    own = _own_rerank(worker.url, cut)
    co = cohere.ClientV2(api_key=TOKEN, base_url=worker.url)
    got = co.rerank(model="gainrag", query=QUERY, documents=documents, max_tokens_per_doc=8)
    assert [r.index for r in got.results] == [i for i, _ in own]
    for r, (_, logit) in zip(got.results, own, strict=True):
        assert r.relevance_score == pytest.approx(_sigmoid(logit), abs=1e-6)


def test_v1_rerank_with_the_official_sdk(worker: Service, documents: list[str]) -> None:
    own = _own_rerank(worker.url, documents)
    co = cohere.Client(api_key=TOKEN, base_url=worker.url)
    plain = co.rerank(query=QUERY, documents=documents)
    assert [r.index for r in plain.results] == [i for i, _ in own]
    assert all(r.document is None for r in plain.results)  # return_documents defaults to false
    assert plain.meta is not None and plain.meta.api_version is not None
    assert plain.meta.api_version.version == "1"

    # Objects with a text field: the other fields come back with the document.
    objects = [{"text": d, "doc_id": f"d{i}"} for i, d in enumerate(documents)]
    top = co.rerank(query=QUERY, documents=objects, top_n=4, return_documents=True)
    assert [r.index for r in top.results] == [i for i, _ in own[:4]]
    for r in top.results:
        assert r.document is not None and r.document.text == documents[r.index]
        assert r.document.dict()["doc_id"] == f"d{r.index}"


def test_errors_reach_the_sdk_in_the_error_shape(worker: Service, documents: list[str]) -> None:
    co = cohere.ClientV2(api_key=TOKEN, base_url=worker.url)
    with pytest.raises(ApiError) as info:
        co.rerank(model="gainrag", query=QUERY, documents=[])
    assert info.value.status_code == 422
    assert info.value.body["error"]["code"] == "validation_error"

    v1 = cohere.Client(api_key=TOKEN, base_url=worker.url)
    with pytest.raises(ApiError) as info:
        v1.rerank(query=QUERY, documents=[{"title": "no text"}])
    assert info.value.status_code == 422
    assert info.value.body["error"]["code"] == "missing_field"
    assert "text" in info.value.body["error"]["message"]

    wrong = cohere.ClientV2(api_key="not-the-token", base_url=worker.url)
    with pytest.raises(ApiError) as info:
        wrong.rerank(model="gainrag", query=QUERY, documents=documents[:2])
    assert info.value.status_code == 401
    assert set(info.value.body["error"]) == {"message", "type", "code"}


def test_cohere_routes_are_in_the_worker_openapi(worker: Service) -> None:
    spec = httpx.get(f"{worker.url}/openapi.json", timeout=10)
    assert spec.status_code == 200
    assert {"/rerank", "/v1/rerank", "/v2/rerank"} <= set(spec.json()["paths"])


@pytest.mark.parametrize(
    "document",
    [{"text": "a", "\ud800": "x"}, {"text": "a", "note": "\ud800"}, {"text": "a", "n": 3}],
    ids=["surrogate-name", "surrogate-value", "non-string-field"],
)
def test_document_fields_that_cannot_be_returned_are_422(worker: Service, document: dict) -> None:
    # Returned as given with return_documents: a field that could not be encoded is refused.
    r = httpx.post(
        f"{worker.url}/v1/rerank",
        content=json.dumps({"query": QUERY, "documents": [document], "return_documents": True}),
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert set(r.json()["error"]) == {"message", "type", "code"}
