"""The documents API on real processes: a running gateway answers from a posted Markdown file and
forgets it after a delete; ingestion and questions run together; ``kill -9`` during writes loses
no acknowledged document and leaves none half-indexed; split off, the retrieval worker holds the
documents and the gateway proxies to it.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gainrag.keys import KeyRecord, append_key, hash_key, new_key
from gainrag.retrieval.index import PassageIndex
from gainrag.retrieval.store import STORE_FILE
from gainrag_harness import Service, gainrag_service
from tests.conftest import keyed_gateway_env

pytestmark = pytest.mark.servers

MARKDOWN = """# Quintaria

Quintaria is a small island republic in the northern sea. The zorbleflax of Quintaria is a
bright teal bird that nests only on the island's northern cliffs.

## History

The island was settled by fishermen in the twelfth century, who traded dried cod for grain.
"""
QUESTION = "What colour is the zorbleflax of Quintaria?"


@dataclass(frozen=True)
class Setup:
    root: Path
    env: dict[str, str]
    keys: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[who]}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, index_dir: Path, small_corpus: Path) -> Setup:
    """A private index copy, a keys file with a reading and a writing key, the gateway's env."""
    root = tmp_path_factory.mktemp("docsvc")
    index = root / "index"
    shutil.copytree(index_dir, index)
    keys = root / "keys.jsonl"
    plain = {"reader": new_key(), "writer": new_key()}
    # rates above the default (5/s): the drills ask faster than a client should; admission
    # itself is tested in tests/test_security.py
    for name in ("reader", "writer"):
        record = KeyRecord(
            name, hash_key(plain[name]), rate=1000.0, burst=1000, can_write=name == "writer"
        )
        append_key(keys, record)
    env = keyed_gateway_env(index, small_corpus, keys, pseudo_tokens=8, answer_tokens=6)
    env.update({"GAINRAG_PIPELINE__PSEUDO_PASSAGE": "false", "GAINRAG_RETRIEVAL__DTYPE": "float32"})
    return Setup(root, env, plain)


@pytest.fixture(scope="module")
def gateway(setup: Setup) -> Iterator[Service]:
    svc = gainrag_service("gateway", ["serve"], setup.root, setup.env, threads=1)
    with svc:
        yield svc


def cited(body: dict[str, object]) -> set[str]:
    """Document ids among an answer's passages and candidates."""
    out = set()
    for key in ("passages", "candidates"):
        for p in body.get(key) or []:  # type: ignore[attr-defined]
            if p.get("document_id"):
                out.add(p["document_id"])
    return out


def test_a_posted_markdown_file_is_answered_from_then_forgotten(
    gateway: Service, setup: Setup
) -> None:
    reader, writer = setup.auth("reader"), setup.auth("writer")
    with httpx.Client(base_url=gateway.url, timeout=120) as c:
        doc = {"id": "quintaria", "title": "Quintaria", "text": MARKDOWN, "format": "markdown"}
        refused = c.post("/v1/documents", json={"documents": [doc]}, headers=reader)
        assert refused.status_code == 403, refused.text
        t = time.perf_counter()
        r = c.post("/v1/documents", json={"documents": [doc]}, headers=writer)
        assert r.status_code == 200, r.text
        added = r.json()
        a = c.post(
            "/answer",
            json={"question": QUESTION, "return_candidates": True},
            headers={**reader, "cache-control": "no-cache"},
        )
        elapsed = time.perf_counter() - t
        assert a.status_code == 200, a.text
        top = a.json()["passages"][0]
        assert top["document_id"] == "quintaria", a.json()["passages"]
        assert top["id"] in added["documents"][0]["passage_ids"]
        assert "teal" in top["text"]
        print(f"posted and answered from in {elapsed:.1f} s")  # the "within seconds"
        d = c.delete("/v1/documents/quintaria", headers=writer)
        assert d.status_code == 200, d.text
        for q in (QUESTION, "Who settled Quintaria?", "Quintaria island history"):
            a = c.post("/answer", json={"question": q, "return_candidates": True}, headers=reader)
            assert a.status_code == 200 and "quintaria" not in cited(a.json())
        assert c.get("/v1/documents/quintaria", headers=reader).status_code == 404
        metrics = c.get("/metrics").text
        assert 'gainrag_ingest_documents_total{status="created"}' in metrics
        assert "gainrag_ingest_queue_size 0.0" in metrics


def test_ingestion_and_questions_run_together(gateway: Service, setup: Setup) -> None:
    reader, writer = setup.auth("reader"), setup.auth("writer")

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=300) as c:
            writes = [
                c.post(
                    "/v1/documents",
                    json={"documents": [{"id": f"c{w}-{i}", "text": f"Cobalt note {w}-{i}. " * 90}
                                        for i in range(3)]},
                    headers=writer,
                )
                for w in range(3)
            ]  # fmt: skip
            asks = [
                c.post("/answer", json={"question": q}, headers=reader)
                for q in ("who got the first nobel prize in physics", "cobalt note", "hops")
            ]
            got = await asyncio.gather(*writes, *asks)
            return list(got[:3]), list(got[3:])

    writes, asks = asyncio.run(main())
    assert all(r.status_code == 200 for r in writes), [r.text for r in writes]
    assert all(r.status_code == 200 for r in asks), [r.text for r in asks]
    versions = {r.json()["index_version"] for r in writes}
    assert len(versions) == 3  # three writes, three versions
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        page = c.get("/v1/documents", params={"collection": "default"}, headers=reader).json()
        ids = {d["id"] for d in page["documents"]}
        assert {f"c{w}-{i}" for w in range(3) for i in range(3)} <= ids


def test_kill_9_during_writes_loses_no_acknowledged_document(
    setup: Setup, small_corpus: Path, index_dir: Path
) -> None:
    """Writes go on in a loop; the gateway is killed mid-write three times at different
    moments and restarted on the same index: every acknowledged document is back whole, and no
    document is half there (its passages all indexed or none)."""
    root = setup.root
    index = root / "kill-index"
    shutil.copytree(index_dir, index)
    env = dict(setup.env)
    env["GAINRAG_RETRIEVAL__INDEX_DIR"] = str(index)
    writer = setup.auth("writer")
    acked: dict[str, list[str]] = {}
    for round_, delay in enumerate((0.3, 0.9, 1.6)):
        svc = gainrag_service(f"killed-{round_}", ["serve"], root, env, threads=1).start()
        stop = threading.Event()

        def write_loop(url: str = svc.url, r: int = round_, stop: threading.Event = stop) -> None:
            n = 0
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    docs = [
                        {"id": f"k{r}-{n}-{j}", "text": f"Killing drill {r} {n} {j}. " * 120}
                        for j in range(2)
                    ]
                    n += 1
                    try:
                        resp = c.post("/v1/documents", json={"documents": docs}, headers=writer)
                    except httpx.HTTPError:
                        return  # the process died under this write: it was never acknowledged
                    if resp.status_code == 200:
                        for d in resp.json()["documents"]:
                            acked[d["id"]] = d["passage_ids"]

        thread = threading.Thread(target=write_loop)
        thread.start()
        time.sleep(3.0 + delay)  # some writes acknowledged, one in flight
        svc.kill()
        stop.set()
        thread.join(timeout=60)
    assert len(acked) >= 6
    # restart: the index comes back from the store, FAISS and BM25 rebuilt where they lag
    svc = gainrag_service("restarted", ["serve"], root, env, threads=1)
    with svc, httpx.Client(base_url=svc.url, timeout=60) as c:
        for doc_id, pids in acked.items():
            r = c.get(f"/v1/documents/{doc_id}", headers=writer)
            assert r.status_code == 200, (doc_id, r.text)
            assert r.json()["passage_ids"] == pids
        ready = c.get("/ready").json()
    # none half-written: every stored document has exactly the passages its row counts (a write
    # torn by the kill would leave a document without some of them), and the meta's count is
    # the passages'
    with sqlite3.connect(index / STORE_FILE) as db:
        torn = db.execute(
            "SELECT d.id, d.passages, count(p.fid) FROM documents d LEFT JOIN passages p "
            "ON p.doc_id = d.id GROUP BY d.id HAVING d.passages != count(p.fid)"
        ).fetchall()
        assert torn == []
        (count,) = db.execute("SELECT count(*) FROM passages").fetchone()
        (meta,) = db.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()
        assert int(meta) == count
    loaded = PassageIndex.load(index, use_gpu=False)
    try:
        assert len(loaded) == count and ready["models"]["index_version"] == loaded.version
    finally:
        loaded.close()


def test_split_off_the_retrieval_worker_holds_the_documents(setup: Setup, index_dir: Path) -> None:
    root = setup.root
    index = root / "worker-index"
    shutil.copytree(index_dir, index)
    common = {"GAINRAG_RETRIEVAL__INDEX_DIR": str(index), "GAINRAG_LOG_LEVEL": "WARNING",
              "GAINRAG_RETRIEVAL__DTYPE": "float32"}  # fmt: skip
    worker = gainrag_service("docs-retriever", ["worker", "retrieval"], root, common, threads=1)
    env = {**setup.env, **common, "GAINRAG_RETRIEVAL__URL": worker.url}
    gateway = gainrag_service("docs-gateway", ["serve"], root, env, threads=1)
    reader, writer = setup.auth("reader"), setup.auth("writer")
    with worker, gateway, httpx.Client(base_url=gateway.url, timeout=120) as c:
        doc = {"id": "quintaria", "title": "Quintaria", "text": MARKDOWN, "format": "markdown"}
        r = c.post("/v1/documents", json={"documents": [doc]}, headers=writer)
        assert r.status_code == 200, r.text
        # the gateway's cache keys move with the write at once (not at its next retrieval)
        assert c.get("/ready").json()["models"]["index_version"] == r.json()["index_version"]
        # the worker holds it (asked directly) and the gateway answers from it
        direct = httpx.get(f"{worker.url}/v1/documents/quintaria", timeout=30)
        assert direct.status_code == 200 and direct.json()["passage_ids"]
        a = c.post("/answer", json={"question": QUESTION}, headers=reader)
        assert a.status_code == 200 and a.json()["passages"][0]["document_id"] == "quintaria"
        # the worker's 404 and 422 pass through the gateway as they are
        missing = c.get("/v1/documents/nope", headers=reader)
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "document_not_found"
        empty = c.post("/v1/documents", json={"documents": [{"text": " "}]}, headers=writer)
        assert empty.status_code == 422 and empty.json()["error"]["code"] == "empty_document"
        assert c.delete("/v1/documents/quintaria", headers=writer).status_code == 200
        assert httpx.get(f"{worker.url}/v1/documents/quintaria", timeout=30).status_code == 404
