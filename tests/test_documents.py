"""The passage store, the writable index and the documents API (in process, real encoder).

The process-level drills (a running service, ``kill -9``, split workers) are in
tests/test_documents_service.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from gainrag.api import create_app
from gainrag.config import DocumentSettings, Settings
from gainrag.errors import (
    NotFoundError,
    OverloadedError,
    UnavailableError,
    ValidationFailedError,
)
from gainrag.keys import KeyRecord, append_key, hash_key, new_key
from gainrag.retrieval.documents import LocalDocuments
from gainrag.retrieval.encoder import BiEncoder
from gainrag.retrieval.index import (
    FAISS_STAMP,
    PassageIndex,
    build_index,
    read_manifest,
)
from gainrag.retrieval.local import LocalRetriever
from gainrag.retrieval.splitter import split
from gainrag.retrieval.store import STORE_FILE, NewDocument, PassageStore, next_version
from gainrag.retrieval.wire import AddDocumentsRequest
from gainrag.types import Passage, document_id
from gainrag.wiring import build_components
from tests.conftest import make_settings

QUINTARIA = (
    "# Quintaria\n\nQuintaria is a small island republic. The zorbleflax of Quintaria is a "
    "bright teal bird that nests only on the island's northern cliffs.\n\n## History\n\n"
    + "The island was settled by fishermen in the twelfth century. "
    * 25
)
QUESTION = "What colour is the zorbleflax of Quintaria?"


@pytest.fixture
def index_copy(tmp_path: Path, index_dir: Path) -> Path:
    """A private copy of the session's small index: these tests write to it."""
    out = tmp_path / "index"
    shutil.copytree(index_dir, out)
    return out


def docs_request(*docs: dict[str, object]) -> AddDocumentsRequest:
    return AddDocumentsRequest.model_validate({"documents": list(docs)})


def unit(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- splitter ---------------------------------------------------------------------------------


def test_split_keeps_passages_near_the_target_and_headings_with_their_text() -> None:
    passages = split(QUINTARIA, "markdown", words=100)
    assert len(passages) >= 2
    assert all(len(p.split()) <= 120 for p in passages[:-1])
    assert passages[0].startswith("# Quintaria")
    # no passage is a heading alone: each has at least a quarter of the target in words
    assert all(len(p.split()) >= 25 for p in passages)
    assert "".join(passages).count("fishermen") == 25
    assert split("Just one line.", "text") == ["Just one line."]
    assert split("   \n\n  ", "text") == []


# -- store ------------------------------------------------------------------------------------


def new_doc(doc_id: str, texts: list[str], *, seed: int = 0, sha: str | None = None) -> NewDocument:
    passages = [Passage(f"{doc_id}#{i}", "T", t) for i, t in enumerate(texts)]
    return NewDocument(
        doc_id,
        "c",
        "T",
        {"k": 1},
        sha or f"sha-{doc_id}-{texts}",
        passages,
        unit(len(texts), 4, seed),
    )


def test_store_commit_replace_unchanged_delete_and_version_chain(tmp_path: Path) -> None:
    store = PassageStore.open(tmp_path / STORE_FILE, create=True)
    store.set_meta({"generation": 0, "version": "v0"})
    c1 = store.commit([new_doc("a", ["one", "two"]), new_doc("b", ["three"])], [])
    assert (c1.generation, c1.previous_version) == (1, "v0")
    added = [p for _, p in c1.added]
    assert c1.version == next_version("v0", added, [])
    assert [p.id for p in added] == ["a#0", "a#1", "b#0"]
    fids = [f for f, _ in c1.added]
    assert fids == sorted(fids) and len(set(fids)) == 3
    # the same content again: nothing changes, not even the version
    same = store.commit([new_doc("a", ["one", "two"])], [])
    assert same.empty and (same.generation, same.version) == (1, c1.version)
    # new content for a: its old passages go, new ones come with new fids (never reused)
    c2 = store.commit([new_doc("a", ["uno"])], [])
    assert c2.generation == 2 and sorted(c2.removed) == fids[:2]
    assert [p.id for _, p in c2.added] == ["a#0"] and c2.added[0][0] > max(fids)
    assert c2.version == next_version(c1.version, [p for _, p in c2.added], ["a#0", "a#1"])
    c3 = store.commit([], ["b"])
    assert c3.removed == [fids[2]] and store.document("b") is None
    rec = store.document("a")
    assert rec is not None and rec.passage_ids == ["a#0"] and rec.metadata == {"k": 1}
    assert store.meta()["count"] == store.count() == 1
    fid_list, vectors = store.vectors(4)
    assert list(fid_list) == [c2.added[0][0]] and vectors.shape == (1, 4)
    store.close()
    # durable: a new connection sees every committed change
    again = PassageStore.open(tmp_path / STORE_FILE)
    assert again.meta()["generation"] == 3 and again.count() == 1
    again.close()


def test_store_rolls_back_a_failed_write_whole(tmp_path: Path) -> None:
    store = PassageStore.open(tmp_path / STORE_FILE, create=True)
    store.set_meta({"generation": 0, "version": "v0"})
    store.commit([new_doc("a", ["x"])], [])
    # b's second passage collides with a's passage id: the whole write must vanish
    bad = NewDocument(
        "b", "c", "T", {}, "s", [Passage("b#0", "", "y"), Passage("a#0", "", "z")], unit(2, 4)
    )
    with pytest.raises(Exception, match="UNIQUE"):
        store.commit([bad], [])
    assert store.document("b") is None and store.count() == 1
    assert store.meta()["generation"] == 1
    store.close()


def test_documents_page_by_id_and_filter_by_collection(tmp_path: Path) -> None:
    store = PassageStore.open(tmp_path / STORE_FILE, create=True)
    store.set_meta({"generation": 0, "version": "v0"})
    docs = [new_doc(f"d{i}", [f"t{i}"]) for i in range(5)]
    store.commit(docs, [])
    first = store.documents(collection=None, after=None, limit=2)
    assert [d.id for d in first] == ["d0", "d1"]
    rest = store.documents(collection=None, after="d1", limit=10)
    assert [d.id for d in rest] == ["d2", "d3", "d4"]
    assert store.documents(collection="other", after=None, limit=10) == []
    assert store.collections() == {"c": 5}
    store.close()


# -- the index --------------------------------------------------------------------------------


def test_index_adds_and_removes_by_id_and_search_sees_it(index_copy: Path) -> None:
    index = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    n = len(index)
    probe = unit(1, seed=7)
    store = index.store
    change = store.commit(
        [NewDocument("new", "c", "", {}, "s", [Passage("new#0", "", "zz")], probe)], []
    )
    assert index.search(probe, 1)[0][0].passage.id != "new#0"  # committed, not yet applied
    index.apply(change)
    hit = index.search(probe, 1)[0][0]
    assert hit.passage.id == "new#0" and hit.score == pytest.approx(1.0, abs=1e-5)
    assert len(index) == n + 1 and index.version == change.version
    stored = index.vectors_of(["new#0"])
    assert stored is not None and np.allclose(stored[0], probe[0])
    gone = store.commit([], ["new"])
    index.apply(gone)
    assert all(h.passage.id != "new#0" for h in index.search(probe, 5)[0])
    assert index.get("new#0") is None and len(index) == n
    index.close()


def test_index_rebuilds_faiss_and_bm25_from_the_store_when_they_lag(index_copy: Path) -> None:
    # A crash after the store's commit and before FAISS/BM25 caught up: write to the store
    # alone, as a killed process would have left it, then load.
    store = PassageStore.open(index_copy / STORE_FILE)
    probe = unit(1, seed=3)
    store.commit(
        [NewDocument("late", "c", "", {}, "s", [Passage("late#0", "", "quokka marsupial")], probe)],
        ["squad-00000"] if store.document("squad-00000") else [],
    )
    store.close()
    stamp = json.loads((index_copy / FAISS_STAMP).read_text())
    index = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    assert index.generation == stamp["generation"] + 1
    assert index.search(probe, 1)[0][0].passage.id == "late#0"
    assert index.lexical is not None and index.lexical.generation == index.generation
    hits = index.search(probe, 3, texts=["quokka"], fusion=None)
    assert hits[0][0].passage.id == "late#0"
    assert index.lexical.search(["quokka"], 1)[0][0][0] == index.position("late#0")
    assert json.loads((index_copy / FAISS_STAMP).read_text())["generation"] == index.generation
    index.close()


def test_a_format_1_index_is_migrated_with_its_vectors_and_version(
    tmp_path: Path, index_dir: Path, encoder: BiEncoder
) -> None:
    import faiss

    index = PassageIndex.load(index_dir, use_gpu=False)
    passages = index.passages
    vectors = index.vectors_of([p.id for p in passages])
    assert vectors is not None
    old = tmp_path / "v1"
    old.mkdir()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    faiss.write_index(flat, str(old / "index.faiss"))
    with (old / "passages.jsonl").open("w") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    manifest = dict(index.manifest, format=1)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(old) is not None and not (old / STORE_FILE).exists()
    migrated = PassageIndex.load(old, use_gpu=False)
    assert (old / STORE_FILE).is_file() and migrated.manifest["migrated_from_format"] == 1
    assert migrated.version == index.version and len(migrated) == len(index)
    q = encoder.encode(["who got the first nobel prize in physics"])
    assert [h.passage.id for h in migrated.search(q, 5)[0]] == [
        h.passage.id for h in index.search(q, 5)[0]
    ]
    migrated.close()
    index.close()


def test_build_index_writes_the_store_and_the_derived_files(
    tmp_path: Path, small_corpus: Path, encoder: BiEncoder
) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(small_corpus.read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "idx"
    manifest = build_index(corpus, out, encoder, show_progress=False)
    assert {p.name for p in out.iterdir()} >= {
        STORE_FILE,
        "index.faiss",
        FAISS_STAMP,
        "bm25",
        "manifest.json",
    }
    meta = read_manifest(out)
    assert meta is not None and meta["version"] == manifest["version"] and meta["count"] == 12
    store = PassageStore.open(out / STORE_FILE)
    assert store.collections() == {"corpus": 12} and store.count_documents() == 12
    first = json.loads(corpus.read_text().splitlines()[0])
    rec = store.document(first["id"])
    assert rec is not None and rec.passage_ids == [first["id"]]  # corpus ids unchanged
    store.close()


# -- the documents backend ----------------------------------------------------------------------


@pytest.fixture
async def documents(index_copy: Path, encoder: BiEncoder) -> AsyncIterator[LocalDocuments]:
    retriever = LocalRetriever(encoder, PassageIndex.load(index_copy, use_gpu=False))
    yield LocalDocuments(retriever, DocumentSettings(), lambda: encoder)
    await retriever.close()


async def test_a_posted_document_is_retrieved_then_gone_after_delete(
    documents: LocalDocuments,
) -> None:
    r = documents.retriever
    before = r.version
    out = await documents.add(
        docs_request({"id": "quint", "title": "Quintaria", "text": QUINTARIA, "format": "markdown"})
    )
    assert out.documents[0].status == "created" and out.passages_added >= 2
    pids = out.documents[0].passage_ids
    assert pids == [f"quint#{i}" for i in range(len(pids))]
    assert out.index_version == r.version != before
    hits = await r.retrieve(QUESTION, 3)
    assert hits[0].passage.id == "quint#0" and document_id(hits[0].passage.id) == "quint"
    assert hits[0].passage.title == "Quintaria"
    # the same document again: nothing re-encoded or re-indexed, the version stays
    again = await documents.add(
        docs_request({"id": "quint", "title": "Quintaria", "text": QUINTARIA, "format": "markdown"})
    )
    assert again.documents[0].status == "unchanged" and again.passages_added == 0
    assert again.index_version == out.index_version
    gone = await documents.delete("quint")
    assert gone.passages_removed == len(pids) and gone.index_version != out.index_version
    assert all(document_id(h.passage.id) != "quint" for h in await r.retrieve(QUESTION, 20))
    with pytest.raises(NotFoundError):
        await documents.delete("quint")
    with pytest.raises(NotFoundError):
        await documents.get("quint")


async def test_replacing_a_document_swaps_its_passages(documents: LocalDocuments) -> None:
    await documents.add(docs_request({"id": "d", "text": "Alpha centauri is a star system."}))
    out = await documents.add(docs_request({"id": "d", "text": "Zebras are striped equids."}))
    assert out.documents[0].status == "replaced"
    assert (out.passages_added, out.passages_removed) == (1, 1)
    idx = documents.retriever.index
    p = idx.get("d#0")
    assert p is not None and p.text == "Zebras are striped equids."


async def test_an_id_given_twice_in_one_request_keeps_the_later_document(
    documents: LocalDocuments,
) -> None:
    out = await documents.add(
        docs_request({"id": "x", "text": "First words."}, {"id": "x", "text": "Second words."})
    )
    assert [d.id for d in out.documents] == ["x"] and out.passages_added == 1
    p = documents.retriever.index.get("x#0")
    assert p is not None and p.text == "Second words."


async def test_ids_default_to_the_content_so_a_repost_is_a_no_op(documents: LocalDocuments) -> None:
    a = await documents.add(docs_request({"text": "Some note about llamas."}))
    b = await documents.add(docs_request({"text": "Some note about llamas."}))
    assert a.documents[0].id == b.documents[0].id and a.documents[0].id.startswith("doc-")
    assert b.documents[0].status == "unchanged"
    page = await documents.list(collection="default", after=None, limit=10)
    assert [d.id for d in page.documents] == [a.documents[0].id]


async def test_bad_documents_fail_before_any_write(documents: LocalDocuments) -> None:
    version = documents.retriever.version
    cases = [
        (docs_request({"id": "x", "text": " \n "}), "empty_document"),
        (docs_request({"text": "a", "metadata": {"k": "v" * 9000}}), "metadata_too_large"),
    ]
    for body, code in cases:
        with pytest.raises(ValidationFailedError) as info:
            await documents.add(body)
        assert info.value.code == code
    limits = DocumentSettings(max_documents=1, max_document_chars=10)
    small = LocalDocuments(documents.retriever, limits, documents._fp32_encoder)
    with pytest.raises(ValidationFailedError, match="limit is 1"):
        await small.add(docs_request({"text": "a"}, {"text": "b"}))
    with pytest.raises(ValidationFailedError, match="limit is 10"):
        await small.add(docs_request({"text": "x" * 11}))
    assert documents.retriever.version == version


async def test_writes_over_the_queue_limit_get_429(documents: LocalDocuments) -> None:
    one = LocalDocuments(
        documents.retriever, DocumentSettings(max_queue=1), documents._fp32_encoder
    )
    first = asyncio.create_task(one.add(docs_request({"text": "First note. " * 200})))
    await asyncio.sleep(0)  # the first is queued
    with pytest.raises(OverloadedError):
        await one.add(docs_request({"text": "Second note."}))
    assert (await first).documents[0].status == "created"


async def test_searches_during_writes_see_whole_documents(documents: LocalDocuments) -> None:
    """Concurrent writes and searches: every search sees each document entirely or not at all."""
    r = documents.retriever
    texts = {f"w{i}": f"Wumpus fact {i}. " * 150 for i in range(6)}  # several passages each

    async def write() -> None:
        for doc_id, text in texts.items():
            await documents.add(docs_request({"id": doc_id, "text": text}))

    seen: list[set[str]] = []

    async def search() -> None:
        while len(seen) < 200:
            hits = await r.retrieve("Wumpus fact", 50)
            seen.append({h.passage.id for h in hits})
            await asyncio.sleep(0)

    await asyncio.gather(write(), search())
    sizes = {d: len(documents.retriever.index.store.document(d).passage_ids) for d in texts}  # type: ignore[union-attr]
    for ids in seen:
        for d, n in sizes.items():
            got = sum(1 for i in ids if document_id(i) == d)
            assert got in (0, n), (d, got, n)


# -- the API in process -------------------------------------------------------------------------


@pytest.fixture
async def api(
    index_copy: Path, small_corpus: Path, llm_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    keys = tmp_path / "keys.jsonl"
    plain = {"reader": new_key(), "writer": new_key()}
    append_key(keys, KeyRecord(name="reader", sha256=hash_key(plain["reader"])))
    append_key(keys, KeyRecord(name="writer", sha256=hash_key(plain["writer"]), can_write=True))
    settings = make_settings(
        index_copy,
        small_corpus,
        api={"keys_file": keys},
        documents={"max_body_bytes": 4096},
        retrieval={"index_dir": index_copy, "k": 5, "dtype": "float32"},
        pipeline={"pseudo_passage": False},
    )
    components = build_components(settings)
    app = create_app(settings, components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            yield c, {k: f"Bearer {v}" for k, v in plain.items()}
    await components.close()


async def test_api_ingests_answers_from_it_and_forgets_it(
    api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, keys = api
    writer, reader = {"authorization": keys["writer"]}, {"authorization": keys["reader"]}
    doc = {"id": "quint", "title": "Quintaria", "text": QUINTARIA[:1500], "format": "markdown"}
    refused = await client.post("/v1/documents", json={"documents": [doc]}, headers=reader)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "write_forbidden"
    r = await client.post("/v1/documents", json={"documents": [doc]}, headers=writer)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["documents"][0]["status"] == "created"
    a = await client.post(
        "/answer", json={"question": QUESTION}, headers={**reader, "cache-control": "no-cache"}
    )
    assert a.status_code == 200, a.text
    cited = a.json()["passages"][0]
    assert cited["document_id"] == "quint" and cited["id"].startswith("quint#")
    assert a.json()["models"]["index_version"] == body["index_version"]
    got = await client.get("/v1/documents/quint", headers=reader)
    assert (
        got.status_code == 200 and got.json()["passage_ids"] == body["documents"][0]["passage_ids"]
    )
    page = await client.get("/v1/documents", params={"collection": "default"}, headers=reader)
    assert [d["id"] for d in page.json()["documents"]] == ["quint"]
    assert (await client.delete("/v1/documents/quint", headers=reader)).status_code == 403
    d = await client.delete("/v1/documents/quint", headers=writer)
    assert d.status_code == 200 and d.json()["deleted"] is True
    a2 = await client.post(
        "/answer", json={"question": QUESTION, "return_candidates": True}, headers=reader
    )
    assert a2.status_code == 200
    assert all(c["document_id"] != "quint" for c in a2.json()["candidates"])
    missing = await client.get("/v1/documents/quint", headers=reader)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "document_not_found"


async def test_api_refuses_bad_document_requests_clearly(
    api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, keys = api
    writer = {"authorization": keys["writer"]}
    cases = [
        ({"documents": []}, 422),
        ({"documents": [{"text": "x", "bogus": 1}]}, 422),
        ({"documents": [{"id": "a/b", "text": "x"}]}, 422),
        ({"documents": [{"id": "a#1", "text": "x"}]}, 422),
        ({"documents": [{"text": "x", "format": "pdf"}]}, 422),
        ({"documents": [{"text": "x" * 5000}]}, 413),  # over this app's 4096-byte body limit
    ]
    for body, status in cases:
        r = await client.post("/v1/documents", json=body, headers=writer)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) == {"error"}
    assert (
        await client.post("/v1/documents", json={"documents": [{"text": "x"}]})
    ).status_code == 401
    assert (
        await client.get("/v1/documents", params={"limit": 0}, headers=writer)
    ).status_code == 422


def test_settings_default_collection_and_limits_are_documented() -> None:
    d = Settings().documents
    assert d.collection == "default" and d.passage_words == 100 and d.enabled


def test_a_read_only_index_serves_everything_and_refuses_writes(index_copy: Path) -> None:
    # a writer adds a document (the store is now in WAL mode), then the directory is served
    # read-only, as from a read-only mount: search finds it, nothing in the directory changes
    writer = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    probe = unit(1, seed=11)
    doc = NewDocument("ro", "c", "", {}, "s", [Passage("ro#0", "", "okapi forest")], probe)
    writer.apply(writer.store.commit([doc], []))
    writer.close()
    before = {p.name: p.stat().st_mtime_ns for p in index_copy.rglob("*")}
    ro = PassageIndex.load(index_copy, use_gpu=False, lexical=True, read_only=True)
    assert ro.search(probe, 1)[0][0].passage.id == "ro#0"
    assert ro.lexical is not None and ro.lexical.search(["okapi"], 1)[0][0][0] == ro.position(
        "ro#0"
    )
    with pytest.raises(UnavailableError) as info:
        ro.claim_writer()
    assert info.value.code == "index_read_only"
    ro.close()
    assert {p.name: p.stat().st_mtime_ns for p in index_copy.rglob("*")} == before


def test_one_writing_process_per_index(index_copy: Path) -> None:
    a = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    b = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    a.claim_writer()
    with pytest.raises(UnavailableError) as info:
        b.claim_writer()
    assert info.value.code == "index_writer_busy"
    # a writes; a third process that finds BM25 lagging while a holds its writer lock searches
    # a copy in memory instead of failing
    probe = unit(1, seed=5)
    doc = NewDocument("w", "c", "", {}, "s", [Passage("w#0", "", "narwhal tusk")], probe)
    a.apply(a.store.commit([doc], []))
    lagging = a.store.commit(
        [
            NewDocument(
                "x", "c", "", {}, "s", [Passage("x#0", "", "axolotl gills")], unit(1, seed=6)
            )
        ],
        [],
    )
    assert lagging.generation == a.generation + 1  # committed, not applied: BM25 lags
    c = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    assert c.lexical is not None and c.lexical.path is None  # in memory
    assert c.lexical.search(["axolotl"], 1)[0][0][0] == c.position("x#0")
    for index in (a, b, c):
        index.close()
    b2 = PassageIndex.load(index_copy, use_gpu=False)
    b2.claim_writer()  # a's lock went with its close
    b2.close()


def test_index_build_keeps_posted_documents_unless_told(
    tmp_path: Path, small_corpus: Path, encoder: BiEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    from gainrag.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(small_corpus.read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "idx"
    build_index(corpus, out, encoder, show_progress=False)
    index = PassageIndex.load(out, use_gpu=False)
    doc = NewDocument("mine", "default", "", {}, "s", [Passage("mine#0", "", "t")], unit(1))
    index.apply(index.store.commit([doc], []))
    index.close()
    args = ["index", "build", "--corpus", str(corpus), "--out", str(out)]
    assert main(args) == 0 and "up to date" in capsys.readouterr().out  # same corpus: kept
    assert main([*args, "--force"]) != 0
    assert "--discard-documents" in capsys.readouterr().err
    kept = PassageIndex.load(out, use_gpu=False)
    assert kept.get("mine#0") is not None
    kept.close()
    assert main([*args, "--force", "--discard-documents"]) == 0
    rebuilt = PassageIndex.load(out, use_gpu=False)
    assert rebuilt.get("mine#0") is None and len(rebuilt) == 8
    rebuilt.close()


def test_hybrid_search_adds_what_bm25_finds_and_can_report_dense_cosines(
    index_copy: Path, encoder: BiEncoder
) -> None:
    from gainrag.retrieval.index import Fusion

    index = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    # a passage only BM25 can find: a made-up word, and a vector far from any question's
    far = -encoder.encode(["who got the first nobel prize in physics"])
    doc = NewDocument("odd", "c", "", {}, "s", [Passage("odd#0", "", "zyxwvut zyxwvut")], far)
    index.apply(index.store.commit([doc], []))
    text = "who got the first nobel prize in physics zyxwvut"
    q = encoder.encode([text])
    dense = index.search(q, 10)[0]
    assert all(h.passage.id != "odd#0" for h in dense)
    fused = index.search(q, 10, texts=[text], fusion=Fusion(method="mix", weight=0.5))[0]
    assert "odd#0" in [h.passage.id for h in fused]
    mix_dense = Fusion(method="mix", weight=0.5, score="dense")
    by_dense = index.search(q, 10, texts=[text], fusion=mix_dense)[0]
    # the same passages in the same order, each scored by its cosine to the question
    assert [h.passage.id for h in by_dense] == [h.passage.id for h in fused]
    vectors = index.vectors_of([h.passage.id for h in by_dense])
    assert vectors is not None
    np.testing.assert_allclose([h.score for h in by_dense], vectors @ q[0], rtol=1e-5, atol=1e-6)
    index.close()


async def test_hybrid_searches_in_another_thread_see_whole_writes(
    index_copy: Path, encoder: BiEncoder
) -> None:
    """A thread searches (FAISS and BM25, fused) in a tight loop while documents are written:
    each search sees every passage of a document or none of them, in FAISS and BM25 alike."""
    from gainrag.retrieval.index import Fusion

    index = PassageIndex.load(index_copy, use_gpu=False, lexical=True)
    retriever = LocalRetriever(encoder, index, fusion=Fusion())
    documents = LocalDocuments(retriever, DocumentSettings(), lambda: encoder)
    texts = {f"w{i}": f"Wumpus fact number {i}. " * 150 for i in range(6)}
    query = "Wumpus fact number"
    vector = encoder.encode([query])
    stop = threading.Event()
    seen: list[set[str]] = []

    def search() -> None:
        while not stop.is_set():
            dense = index.search(vector, 60)[0]
            fused = index.search(vector, 60, texts=[query], fusion=Fusion(method="mix"))[0]
            seen.append({h.passage.id for h in dense})
            seen.append({h.passage.id for h in fused})

    thread = threading.Thread(target=search)
    thread.start()
    try:
        for doc_id, text in texts.items():
            await documents.add(docs_request({"id": doc_id, "text": text}))
    finally:
        stop.set()
        thread.join()
    records = {d: index.store.document(d) for d in texts}
    sizes = {d: len(r.passage_ids) for d, r in records.items() if r is not None}
    assert sizes.keys() == texts.keys() and min(sizes.values()) >= 2
    states = set()
    for ids in seen:
        counts = {d: sum(1 for i in ids if document_id(i) == d) for d in texts}
        assert all(counts[d] in (0, sizes[d]) for d in texts), counts
        states.add(frozenset(d for d, n in counts.items() if n))
    assert len(states) >= 4  # the searches ran between and during writes, not only after
    await documents.close()
    await retriever.close()


def test_a_gateway_never_takes_an_older_index_version_of_the_same_store() -> None:
    from gainrag.retrieval.remote import RemoteRetriever

    r = RemoteRetriever("http://127.0.0.1:9", timeout_s=1)
    r.learn("v5", 5, "s1")  # a write's response
    r.learn("v4", 4, "s1")  # a search that started before it answers after it
    assert r.version == "v5"
    r.learn("v6", 6, "s1")
    assert r.version == "v6"
    r.learn("w0", 0, "s2")  # another store (a rebuilt or reloaded index): taken as it is
    assert r.version == "w0"
    r.learn("old", None, None)  # a worker that reports no generation
    assert r.version == "old"
