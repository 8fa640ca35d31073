"""The retrieval and selector workers over HTTP (in-process ASGI, real models)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from gainrag.api.workers.retrieval import create_retrieval_app
from gainrag.api.workers.selector import create_selector_app
from gainrag.config import Settings
from gainrag.pipeline import Components
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import build_index
from gainrag.retrieval.local import LocalRetriever
from gainrag.selector.cross_encoder import CrossEncoderSelector
from gainrag.wire import TEXT_OR_EMPTY_PATTERN, TEXT_PATTERN
from tests.conftest import DATA, make_settings


def _error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def _json(body: object) -> dict:
    """Request arguments of a JSON body written with ASCII escapes, as ``\\ud800`` travels on
    the wire (httpx's ``json=`` cannot encode a lone surrogate at all)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
async def selector_client(
    components: Components, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    assert isinstance(components.selector, CrossEncoderSelector)
    app = create_selector_app(settings, selector=components.selector)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sel") as c,
    ):
        yield c


def _documents(n: int, offset: int, words: int = 30) -> list[str]:
    """n real corpus passages (title + the first words), different for each offset."""
    docs: list[str] = []
    with (DATA / "corpus.jsonl").open() as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            row = json.loads(line)
            docs.append(row["title"] + "\n" + " ".join(row["text"].split()[: words + i % 7]))
            if len(docs) == n:
                return docs
    raise AssertionError("corpus too small")


async def test_rerank_contract(selector_client: httpx.AsyncClient, components: Components) -> None:
    docs = _documents(101, 0)
    r = await selector_client.post("/rerank", json={"query": "who wrote hamlet", "documents": docs})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(101))  # no 32-document cap
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert body["usage"]["total_tokens"] > 101 * 10
    assert body["model"].startswith("cross-encoder:") and body["model_version"]
    # The same logits as scoring in-process.
    assert isinstance(components.selector, CrossEncoderSelector)
    direct = components.selector.scorer.score_pairs([("who wrote hamlet", d) for d in docs])
    for x in results:
        assert x["relevance_score"] == pytest.approx(direct[x["index"]], abs=1e-4)

    top = await selector_client.post(
        "/rerank",
        json={"query": "who wrote hamlet", "documents": docs[:5], "top_n": 2,
              "return_documents": True},
    )  # fmt: skip
    assert top.status_code == 200
    got = top.json()["results"]
    assert len(got) == 2 and got[0]["document"]["text"] == docs[got[0]["index"]]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"query": "q", "documents": []}, "validation_error"),
        ({"query": "  ", "documents": ["a"]}, "invalid_query"),
        ({"query": "q", "documents": ["a", 3]}, "validation_error"),
        ({"query": "q"}, "missing_field"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "validation_error"),
        ({"query": "q", "documents": ["a"], "extra": 1}, "unknown_field"),
        ({"query": "q", "documents": ["a"] * 1025}, "too_many_documents"),
        ({"query": "q", "documents": ["x" * 20_001]}, "document_too_long"),
        ({"query": "\u200b\u200d", "documents": ["a"]}, "invalid_query"),
        ({"query": "who\x00", "documents": ["a"]}, "invalid_query"),
        ({"query": "q", "documents": ["a", "b\x1bc"]}, "invalid_document"),
        ({"query": "\x1d", "documents": ["a"]}, "invalid_query"),  # str.isspace(), not \S
        ({"query": "q", "documents": ["a\ud800"]}, "invalid_document"),  # was a 500
        ({"query": "q", "documents": ["a"], "top_n": 1.5}, "validation_error"),
    ],
)
async def test_rerank_bad_input(selector_client: httpx.AsyncClient, body: dict, code: str) -> None:
    _error(await selector_client.post("/rerank", **_json(body)), 422, code)


async def test_rerank_lone_surrogates_are_422_naming_the_document(
    selector_client: httpx.AsyncClient,
) -> None:
    # Valid JSON (an escaped lone surrogate) that is not Unicode text: the tokenizer crashes on it.
    body = b'{"query": "who wrote hamlet", "documents": ["fine", "bad \\ud800 text"]}'
    r = await selector_client.post(
        "/rerank", content=body, headers={"content-type": "application/json"}
    )
    err = _error(r, 422, "invalid_document")
    assert "documents[1]" in err["message"] and "surrogate" in err["message"]
    r = await selector_client.post(
        "/rerank",
        content=b'{"query": "who \\udfff", "documents": ["fine"]}',
        headers={"content-type": "application/json"},
    )
    _error(r, 422, "invalid_query")


async def test_sixteen_concurrent_reranks_share_batches(
    selector_client: httpx.AsyncClient, components: Components
) -> None:
    """16 callers x 101 documents: fewer model batches than requests, each its own scores."""
    labels = {"batcher": "selector"}
    batches0 = _sample("gainrag_batch_requests_count", labels)
    requests0 = _sample("gainrag_batch_requests_sum", labels)
    queries = [f"question number {i} about history" for i in range(16)]
    # Short documents (title + 8-14 words, ~25 tokens a pair): the batching is by pair count, so
    # 16 x 101 pairs still fill several 512-pair batches, and each is scored twice (batched, then
    # alone) in float32; 24-30 words doubled the test's time for the same plumbing.
    docs = [_documents(101, 200 + 37 * i, words=8) for i in range(16)]
    responses = await asyncio.gather(
        *(
            selector_client.post("/rerank", json={"query": q, "documents": d})
            for q, d in zip(queries, docs, strict=True)
        )
    )
    batches = _sample("gainrag_batch_requests_count", labels) - batches0
    assert _sample("gainrag_batch_requests_sum", labels) - requests0 == 16
    assert 1 <= batches < 16, batches
    assert isinstance(components.selector, CrossEncoderSelector)
    scorer = components.selector.scorer
    for q, d, resp in zip(queries, docs, responses, strict=True):
        assert resp.status_code == 200, resp.text
        alone = scorer.score_pairs([(q, x) for x in d])  # unbatched: this request only
        got = {x["index"]: x["relevance_score"] for x in resp.json()["results"]}
        assert len(got) == 101
        for i, s in enumerate(alone):
            assert got[i] == pytest.approx(s, abs=1e-4)


async def test_full_queue_is_429(settings: Settings) -> None:
    assert settings.selector.checkpoint is not None
    sel = CrossEncoderSelector(settings.selector.checkpoint, max_queue=1, max_batch_pairs=101)
    app = create_selector_app(settings, selector=sel)
    body = {"query": "q", "documents": _documents(101, 0)}
    try:
        async with (
            LifespanManager(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c,
        ):
            first = asyncio.ensure_future(c.post("/rerank", json=body))
            while not sel.batcher._current:  # the first request is being scored
                await asyncio.sleep(0.005)
            second = asyncio.ensure_future(c.post("/rerank", json=body))
            while sel.batcher.queue_size < 1:  # the second waits in the queue
                await asyncio.sleep(0.005)
            third = await c.post("/rerank", json=body)
            err = _error(third, 429, "overloaded")
            assert "queue is full" in err["message"] and third.headers["retry-after"] == "1"
            assert (await first).status_code == 200 and (await second).status_code == 200
    finally:
        await sel.close()


async def test_worker_metrics_and_readiness(selector_client: httpx.AsyncClient) -> None:
    ready = await selector_client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"]["selector_version"]
    text = (await selector_client.get("/metrics")).text
    assert "gainrag_batch_requests_bucket" in text
    assert 'gainrag_http_request_seconds_count{method="POST",route="/rerank"' in text


# ---- retrieval worker --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def retrieval_app(
    components: Components, index_dir: Path, small_corpus: Path, encoder: BiEncoder
) -> AsyncIterator[tuple[httpx.AsyncClient, LocalRetriever]]:
    # A retriever of its own: the admin test swaps its index.
    r = LocalRetriever.from_settings(make_settings(index_dir, small_corpus).retrieval, encoder)
    settings = make_settings(index_dir, small_corpus, worker={"admin_token": "s3cret"})
    app = create_retrieval_app(settings, retriever=r)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ret") as c,
    ):
        yield c, r
    await r.close()


async def test_retrieve_contract(
    retrieval_app: tuple[httpx.AsyncClient, LocalRetriever], dev_questions: list[dict]
) -> None:
    client, r = retrieval_app
    qs = [q["question"] for q in dev_questions[:3]]
    resp = await client.post("/retrieve", json={"queries": qs, "k": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["index_version"] == r.version and body["encoder"] == "all-MiniLM-L6-v2"
    expected = r.search_many(qs, 5)
    assert [[h["id"] for h in hits] for hits in body["results"]] == [
        [x.passage.id for x in hits] for hits in expected
    ]
    first = body["results"][0][0]
    assert set(first) == {"id", "title", "text", "score"}
    assert first["score"] == pytest.approx(expected[0][0].score, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"queries": [], "k": 5}, "validation_error"),
        ({"queries": ["ok", " "], "k": 5}, "invalid_query"),
        ({"queries": ["ok"], "k": 0}, "validation_error"),
        ({"queries": "ok"}, "validation_error"),
        ({"queries": ["q"] * 257}, "too_many_queries"),
        ({"queries": ["ok", "nul\x00"]}, "invalid_query"),
        ({"queries": ["\ufeff\u200b"]}, "invalid_query"),
        ({"queries": ["q\udc00"]}, "invalid_query"),  # a lone surrogate was a 500
    ],
)
async def test_retrieve_bad_input(
    retrieval_app: tuple[httpx.AsyncClient, LocalRetriever], body: dict, code: str
) -> None:
    _error(await retrieval_app[0].post("/retrieve", **_json(body)), 422, code)


async def test_worker_schemas_state_their_limits(
    retrieval_app: tuple[httpx.AsyncClient, LocalRetriever], selector_client: httpx.AsyncClient
) -> None:
    """What the handlers check is in /openapi.json, and integral floats are integers."""
    ret = (await retrieval_app[0].get("/openapi.json")).json()["components"]["schemas"]
    queries = ret["RetrieveRequest"]["properties"]["queries"]
    assert queries["maxItems"] == 256 and queries["items"]["maxLength"] == 20_000
    assert queries["items"]["minLength"] == 1 and queries["items"]["pattern"] == TEXT_PATTERN
    sel = (await selector_client.get("/openapi.json")).json()["components"]["schemas"]
    documents = sel["RerankRequest"]["properties"]["documents"]
    assert documents["maxItems"] == 1024 and documents["items"]["pattern"] == TEXT_OR_EMPTY_PATTERN
    r = await retrieval_app[0].post("/retrieve", json={"queries": ["hamlet"], "k": 3.0})
    assert r.status_code == 200 and len(r.json()["results"][0]) == 3
    r = await selector_client.post(
        "/rerank", json={"query": "q", "documents": ["a", "b"], "top_n": 1.0}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 1


async def test_index_hot_swap(
    retrieval_app: tuple[httpx.AsyncClient, LocalRetriever],
    tmp_path: Path,
    small_corpus: Path,
    index_dir: Path,
    encoder: BiEncoder,
    dev_questions: list[dict],
) -> None:
    client, r = retrieval_app
    old_version = r.version
    rows = small_corpus.read_text().splitlines()[:60]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    new_dir = tmp_path / "index2"
    build_index(tmp_path / "c.jsonl", new_dir, encoder, show_progress=False)

    url = "/admin/reload-index"
    _error(await client.post(url, json={"index_dir": str(new_dir)}), 401, "bad_token")
    wrong = {"authorization": "Bearer nope"}
    _error(await client.post(url, json={"index_dir": str(new_dir)}, headers=wrong), 401)
    auth = {"authorization": "Bearer s3cret"}
    missing = await client.post(url, json={"index_dir": str(tmp_path / "none")}, headers=auth)
    _error(missing, 422, "index_missing")
    assert r.version == old_version  # a failed reload changes nothing

    # Searches in flight while the index is swapped all succeed.
    q = dev_questions[0]["question"]
    searches = [
        asyncio.ensure_future(client.post("/retrieve", json={"queries": [q], "k": 3}))
        for _ in range(24)
    ]
    swap = await client.post(url, json={"index_dir": str(new_dir)}, headers=auth)
    assert swap.status_code == 200, swap.text
    body = swap.json()
    assert body["previous_version"] == old_version and body["count"] == 60
    done = await asyncio.gather(*searches)
    assert all(d.status_code == 200 for d in done)
    assert {d.json()["index_version"] for d in done} <= {old_version, body["version"]}
    after = await client.post("/retrieve", json={"queries": [q], "k": 100})
    assert after.json()["index_version"] == r.version == body["version"]
    assert len(after.json()["results"][0]) == 60

    back = await client.post(url, json={"index_dir": str(index_dir)}, headers=auth)
    assert back.status_code == 200 and r.version == old_version


async def test_admin_disabled_without_token(
    components: Components, settings: Settings, index_dir: Path, encoder: BiEncoder
) -> None:
    r = LocalRetriever.from_settings(settings.retrieval, encoder)
    app = create_retrieval_app(settings, retriever=r)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c,
    ):
        resp = await c.post("/admin/reload-index", headers={"authorization": "Bearer x"})
        _error(resp, 403, "admin_disabled")
    await r.close()


async def test_worker_not_ready_is_503(settings: Settings, tmp_path: Path) -> None:
    broken = make_settings(tmp_path / "no-index", tmp_path / "none.jsonl")
    app = create_retrieval_app(broken)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c,
    ):
        assert (await c.get("/health")).status_code == 200
        for _ in range(200):  # loading fails in a background thread
            resp = await c.get("/ready")
            if resp.json()["error"]["code"] == "load_failed":
                break
            await asyncio.sleep(0.05)
        err = _error(resp, 503, "load_failed")
        assert "no index" in err["message"]
        _error(await c.post("/retrieve", json={"queries": ["q"]}), 503, "load_failed")
