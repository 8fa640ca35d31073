"""Feedback: served answers recorded (both routes, streamed or not, cache hits), POST
/v1/feedback on them (keys, 404, 422), the bound and retention of the records (SQLite and a real
Redis), recording that never fails an answer, and the export as training questions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from gainrag.api import create_app
from gainrag.cli import main
from gainrag.config import FeedbackSettings, Settings
from gainrag.errors import NotFoundError, UnavailableError
from gainrag.evaluation.questions import load_questions
from gainrag.feedback import (
    FeedbackLog,
    RedisStore,
    Served,
    SqliteStore,
    Store,
    export,
    parse_since,
    training_row,
)
from gainrag.keys import KeyRecord, append_key, hash_key, new_key
from gainrag.pipeline import Components
from gainrag.training.questions import select_questions
from gainrag.types import PSEUDO_ID, AnswerResult, Passage, Scored
from gainrag_harness import Service, redis_service
from tests.conftest import make_settings
from tests.fake_gateway import MemoryCache
from tests.test_api import assert_error
from tests.test_streaming import parse_sse

QUESTION = "who got the first nobel prize in physics"


# -- the log and its stores, without models -------------------------------------------------------


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def result(answer: str = "Röntgen", selected: tuple[str, ...] = ("p1",)) -> AnswerResult:
    cands = [
        Scored(Passage(pid, "T", "text"), 0.9 - i / 10, i, 0.5, 0.8)
        for i, pid in enumerate((*selected, "p9"))
    ]
    return AnswerResult(answer, cands[: len(selected)], cands, [], None)


def served(rid: str, at: float, key: str = "k", answer: str = "Röntgen") -> Served:
    return Served(rid, key, "/answer", False, at, f"question {rid}", 1, {"m": "v"}, result(answer))


def const(s: Served) -> Callable[[], Served]:
    return lambda: s


async def record(log: FeedbackLog, *items: Served) -> None:
    for s in items:
        log.record(const(s))
    await log.flush()


async def found(log: FeedbackLog, key: str, rid: str) -> bool:
    try:
        await log.give(key, rid, "up")
    except NotFoundError as exc:
        assert exc.code == "request_not_found" and exc.status_code == 404
        return False
    return True


async def check_bound_and_retention(store: Store) -> None:
    """The same exact behaviour from every store."""
    clock = Clock()
    log = FeedbackLog(store, FeedbackSettings(max_records=3, retention_s=100), clock)
    try:
        t0 = clock.now
        await record(log, *(served(f"r{i}", t0 + i) for i in range(5)))
        assert await store.count_served() == 3  # the bound: the two oldest are gone
        assert [await found(log, "k", f"r{i}") for i in range(5)] == [False] * 2 + [True] * 3
        # retention: kept while at most retention_s old, to the boundary
        clock.now = t0 + 2 + 100
        assert await found(log, "k", "r2")
        clock.now = t0 + 2 + 100.001
        assert not await found(log, "k", "r2")
        assert await found(log, "k", "r3")
        # the next write deletes what expired (r2 and r3), not only hides it
        clock.now = t0 + 103.5
        await record(log, served("r5", clock.now))
        assert await store.count_served() == 2
        # keys are apart: another key's answer with the same id is not found, nor replaces
        assert not await found(log, "other", "r4")
        await record(log, served("r4", clock.now, key="other"))
        assert await found(log, "other", "r4") and await found(log, "k", "r4")
        assert await store.count_served() == 3
        # a key's reused request id: the later answer replaces the record
        await record(log, served("r4", clock.now, answer="Marie Curie"))
        await log.give("k", "r4", "up")
        rows = [training_row(_unpack(b)) for b in await store.feedback()]
        answers = {(r["key"], r["request_id"]): r["answers"] for r in rows if r is not None}
        assert (answers[("k", "r4")], answers[("other", "r4")]) == (["Marie Curie"], ["Röntgen"])
    finally:
        await log.close()


def _unpack(blob: bytes) -> dict[str, Any]:
    from gainrag.feedback import unpack

    return unpack(blob)


async def test_sqlite_store_bound_and_retention_are_exact(tmp_path: Path) -> None:
    await check_bound_and_retention(SqliteStore(tmp_path / "fb.sqlite"))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with redis_service(tmp_path_factory.mktemp("redis")) as svc:
        yield svc


async def test_redis_store_bound_and_retention_are_exact(redis_server: Service) -> None:
    await check_bound_and_retention(RedisStore(f"{redis_server.url}/1", "bound:"))


async def test_feedback_is_kept_after_its_answer_expires_and_a_repost_replaces_it(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "fb.sqlite")
    log = FeedbackLog(store, FeedbackSettings(max_records=10, retention_s=10), clock)
    await record(log, served("a", clock.now))
    assert await log.give("k", "a", "down") == ("a", False)
    assert await log.give("k", "a", "up", "Röntgen", "typo fixed") == ("a", True)
    clock.now += 11
    await record(log, served("b", clock.now))  # the write that deletes "a"'s record
    assert await store.count_served() == 1
    await log.close()
    reopened = SqliteStore(tmp_path / "fb.sqlite")  # durable: a new connection sees it
    (only,) = [_unpack(b) for b in await reopened.feedback()]
    assert (only["rating"], only["correct_answer"], only["comment"]) == (
        "up",
        "Röntgen",
        "typo fixed",
    )
    await reopened.close()


class BrokenStore(SqliteStore):
    """A store whose every call fails."""

    async def put_served(self, rows: Any, cutoff: float, max_records: int) -> None:
        raise OSError("disk full")

    async def get_served(self, key: str, request_id: str) -> tuple[float, bytes] | None:
        raise OSError("disk full")


def records(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("gainrag_feedback_records_total", labels) or 0.0


async def test_a_failing_store_loses_records_counted_and_feedback_gets_503(
    tmp_path: Path,
) -> None:
    log = FeedbackLog(BrokenStore(tmp_path / "x.sqlite"), FeedbackSettings())
    before = records("error")
    log.record(lambda: served("a", 1.0))  # never raises
    log.record(lambda: 1 / 0)  # type: ignore[arg-type, return-value]  # nor does a broken record
    await log.flush()
    assert records("error") == before + 2
    with pytest.raises(UnavailableError) as info:
        await log.give("k", "a", "up")
    assert info.value.code == "feedback_unavailable"
    await log.close()
    dropped = records("dropped")
    log.record(lambda: served("b", 1.0))  # after close: dropped, counted
    assert records("dropped") == dropped + 1


# -- the export rule --------------------------------------------------------------------------


def fb(
    rating: str, correct: str | None = None, selected: tuple[str, ...] = ("p1", PSEUDO_ID)
) -> dict[str, Any]:
    s = dataclasses.replace(served("r", 1_764_547_200.0), result=result("Röntgen", selected))
    return {
        "key": "web",
        "request_id": "r",
        "rating": rating,
        "correct_answer": correct,
        "comment": None,
        "given_at": 1_764_547_260.5,
        "served": s.to_json(),
    }


def test_training_rows_follow_the_rule() -> None:
    up = training_row(fb("up"))
    assert up is not None
    # rated up: the served answer; gold = the selected passages, never the pseudo-passage
    assert (up["id"], up["answers"], up["gold_ids"], up["source"]) == (
        "feedback-web-r",
        ["Röntgen"],
        ["p1"],
        "feedback",
    )
    assert up["selected_ids"] == ["p1", PSEUDO_ID] and up["question"] == "question r"
    assert (up["given_at"], up["served_at"]) == (
        "2025-12-01T00:01:00.500+00:00",
        "2025-12-01T00:00:00.000+00:00",
    )
    assert [c["id"] for c in up["candidates"]] == ["p1", PSEUDO_ID, "p9"]
    # a correct answer wins; the selection is gold only when the answer was rated right
    fixed = training_row(fb("up", "Wilhelm Röntgen"))
    assert fixed is not None and (fixed["answers"], fixed["gold_ids"]) == (
        ["Wilhelm Röntgen"],
        ["p1"],
    )
    wrong = training_row(fb("down", "Wilhelm Röntgen"))
    assert wrong is not None and (wrong["answers"], wrong["gold_ids"]) == (["Wilhelm Röntgen"], [])
    assert training_row(fb("down")) is None  # nothing to learn an answer from


def test_since_takes_iso_times_and_ages() -> None:
    assert parse_since("2025-12-01") == 1_764_547_200.0
    assert parse_since("2025-12-01T01:00:00+01:00") == 1_764_547_200.0
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("7d", now=1e6) == 1e6 - 7 * 86400
    with pytest.raises(Exception, match="--since"):
        parse_since("last week")


# -- the API, in process, real models -----------------------------------------------------------


@pytest.fixture
async def api(
    index_dir: Path, small_corpus: Path, components: Components, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, dict[str, str]], Settings]]:
    keys = tmp_path / "keys.jsonl"
    plain = {"alice": new_key(), "bob": new_key()}
    for name, key in plain.items():
        append_key(keys, KeyRecord(name=name, sha256=hash_key(key), rate=100, burst=100))
    settings = make_settings(
        index_dir,
        small_corpus,
        api={"keys_file": keys, "max_body_bytes": 4096},
        pipeline={"pseudo_passage": False},
        feedback={"path": tmp_path / "feedback.sqlite"},
    )
    # The shared models with a cache of our own (a cache hit is recorded too).
    comps = Components(components.retriever, components.selector, components.generator)
    comps.cache = MemoryCache()
    app = create_app(settings, comps)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            yield c, {n: {"authorization": f"Bearer {k}"} for n, k in plain.items()}, settings


def cited(passages: list[dict[str, Any]]) -> list[str]:
    return [p["id"] for p in passages if not p["pseudo"]]


async def test_feedback_on_every_kind_of_answer_comes_back_as_training_questions(
    api: tuple[httpx.AsyncClient, dict[str, dict[str, str]], Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, keys, settings = api
    alice, bob = keys["alice"], keys["bob"]

    async def feedback(body: dict[str, Any], who: dict[str, str] = alice) -> httpx.Response:
        return await client.post("/v1/feedback", json=body, headers=who)

    # /answer, then the same question again from the cache
    a = await client.post("/answer", json={"question": QUESTION}, headers=alice)
    assert a.status_code == 200 and a.headers["x-cache"] == "MISS", a.text
    hit = await client.post("/answer", json={"question": QUESTION}, headers=alice)
    assert hit.headers["x-cache"] == "HIT" and hit.json()["cached"] is True
    # /answer streamed
    s = await client.post(
        "/answer",
        json={"question": "where do they grow hops in the us", "stream": True},
        headers=alice,
    )
    done = parse_sse(s.text)[-1][1]
    assert done["request_id"] == s.headers["x-request-id"]
    # /v1/chat/completions, plain and streamed (its chunks carry the id, the header the bare one)
    chat_body = {"model": "gainrag", "messages": [{"role": "user", "content": QUESTION}]}
    c = await client.post(
        "/v1/chat/completions", json=chat_body, headers={**alice, "cache-control": "no-cache"}
    )
    assert c.status_code == 200 and c.json()["id"] == f"chatcmpl-{c.headers['x-request-id']}"
    cs = await client.post(
        "/v1/chat/completions",
        json={
            **chat_body,
            "messages": [
                {"role": "user", "content": "when is the next deadpool movie being released"}
            ],
            "stream": True,
        },
        headers={**alice, "x-request-id": "my-own-id.1"},
    )
    assert cs.status_code == 200 and cs.headers["x-request-id"] == "my-own-id.1"
    streamed_answer = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in cs.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )

    given = [
        ({"request_id": a.json()["request_id"], "rating": "up"}, False),
        (
            {
                "request_id": hit.json()["request_id"],
                "rating": "up",
                "comment": "cached, still right",
            },
            False,
        ),
        ({"request_id": done["request_id"], "rating": "down", "correct_answer": " Yakima "}, False),
        ({"request_id": c.json()["id"], "rating": "down"}, False),
        ({"request_id": "my-own-id.1", "rating": "up"}, False),
        ({"request_id": c.json()["id"], "rating": "up", "correct_answer": "Röntgen"}, True),
    ]
    for body, replaced in given:
        r = await feedback(body)
        assert r.status_code == 200, r.text
        bare = body["request_id"].removeprefix("chatcmpl-")
        assert r.json() == {"request_id": bare, "rating": body["rating"], "replaced": replaced}

    # another key cannot see (nor rate) alice's answers; a made-up id is as unknown
    for who, rid in ((bob, a.json()["request_id"]), (alice, "nope"), (alice, "chatcmpl-nope")):
        err = assert_error(
            await feedback({"request_id": rid, "rating": "up"}, who), 404, "request_not_found", rid
        )
        assert "86400 s" in err["message"]
    assert (await feedback({"request_id": "x", "rating": "up"}, {})).status_code == 401

    # the export, through the command line, on the settings of the serving app
    monkeypatch.setenv("GAINRAG_FEEDBACK__PATH", str(settings.feedback.path))
    monkeypatch.delenv("GAINRAG_REDIS__URL", raising=False)
    out = tmp_path / "feedback.jsonl"
    assert await asyncio.to_thread(main, ["feedback", "export", "--out", str(out)]) == 0
    rows = {r["request_id"]: r for r in load_questions(out)}
    assert list(rows) == [
        a.json()["request_id"],
        hit.json()["request_id"],
        done["request_id"],
        "my-own-id.1",
        c.headers["x-request-id"],
    ]  # given order; the chat answer rated down and then re-rated: once, up
    first = rows[a.json()["request_id"]]
    assert {k: first[k] for k in ("id", "question", "answers", "gold_ids", "source")} == {
        "id": f"feedback-alice-{a.json()['request_id']}",
        "question": QUESTION,
        "answers": [a.json()["answer"]],
        "gold_ids": cited(a.json()["passages"]),
        "source": "feedback",
    }
    assert (first["route"], first["cached"], first["models"]) == (
        "/answer",
        False,
        a.json()["models"],
    )
    # the cache hit's candidates are the cached result's: the first answer's
    assert rows[hit.json()["request_id"]]["cached"] is True
    assert rows[hit.json()["request_id"]]["candidates"] == first["candidates"]
    assert rows[hit.json()["request_id"]]["comment"] == "cached, still right"
    assert [c["id"] for c in first["candidates"]] == [
        p["id"]
        for p in (
            await client.post(
                "/answer", json={"question": QUESTION, "return_candidates": True}, headers=alice
            )
        ).json()["candidates"]
    ]
    wrong = rows[done["request_id"]]
    assert (wrong["answers"], wrong["gold_ids"], wrong["served_answer"]) == (
        ["Yakima"],
        [],
        done["answer"],
    )
    assert rows["my-own-id.1"]["answers"] == [streamed_answer] and streamed_answer
    assert rows["my-own-id.1"]["route"] == "/v1/chat/completions"
    chat = rows[c.headers["x-request-id"]]
    assert (chat["answers"], chat["gold_ids"], chat["rating"]) == (
        ["Röntgen"],
        cited(c.json()["citations"]),
        "up",
    )
    # the signal jobs' reader takes every row
    assert len(select_questions(out, None, seed=0)) == 5

    # filters: the rating, and the time the feedback was given
    assert (
        await asyncio.to_thread(main, ["feedback", "export", "--out", str(out), "--rating", "down"])
        == 0
    )
    assert [r["request_id"] for r in load_questions(out)] == [done["request_id"]]
    assert (
        await asyncio.to_thread(
            main, ["feedback", "export", "--out", str(out), "--since", "2999-01-01"]
        )
        == 0
    )
    assert load_questions(out) == []


async def test_bad_feedback_is_refused_clearly(
    api: tuple[httpx.AsyncClient, dict[str, dict[str, str]], Settings],
) -> None:
    client, keys, _ = api
    alice = keys["alice"]
    cases: list[tuple[Any, int, str]] = [
        ({"rating": "up"}, 422, "missing_field"),
        ({"request_id": "r1"}, 422, "missing_field"),
        ({"request_id": "r1", "rating": "meh"}, 422, "validation_error"),
        ({"request_id": "r1", "rating": 1}, 422, "validation_error"),
        ({"request_id": "r/1", "rating": "up"}, 422, "validation_error"),
        ({"request_id": "r" * 129, "rating": "up"}, 422, "validation_error"),
        (
            {"request_id": "r1", "rating": "up", "correct_answer": "  \u200b "},
            422,
            "validation_error",
        ),
        (
            {"request_id": "r1", "rating": "up", "correct_answer": "a\ud800"},
            422,
            "validation_error",
        ),
        (
            {"request_id": "r1", "rating": "up", "correct_answer": "x" * 1001},
            422,
            "validation_error",
        ),
        ({"request_id": "r1", "rating": "up", "comment": "\x00"}, 422, "validation_error"),
        ({"request_id": "r1", "rating": "up", "extra": 1}, 422, "unknown_field"),
        (["r1", "up"], 422, "validation_error"),
        ({"request_id": "r1", "rating": "up", "comment": "x" * 5000}, 413, "payload_too_large"),
    ]
    json_body = {**alice, "content-type": "application/json"}
    for body, status, code in cases:
        # json.dumps escapes the lone surrogate (httpx's encoder would refuse it)
        r = await client.post("/v1/feedback", content=json.dumps(body), headers=json_body)
        assert_error(r, status, code)
    assert_error(
        await client.post("/v1/feedback", content=b"{not json", headers=json_body),
        400,
        "invalid_json",
    )


async def test_feedback_off_records_nothing_and_refuses(
    index_dir: Path, small_corpus: Path, components: Components, tmp_path: Path
) -> None:
    path = tmp_path / "feedback.sqlite"
    settings = make_settings(
        index_dir,
        small_corpus,
        pipeline={"pseudo_passage": False},
        llm={"max_new_tokens_answer": 4},
        feedback={"enabled": False, "path": path},
    )
    app = create_app(settings, components)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            a = await c.post("/answer", json={"question": QUESTION})
            assert a.status_code == 200
            r = await c.post(
                "/v1/feedback", json={"request_id": a.json()["request_id"], "rating": "up"}
            )
            assert_error(r, 403, "feedback_disabled")
    assert not path.exists()


async def test_replicas_sharing_redis_take_feedback_on_each_others_answers(
    redis_server: Service,
    index_dir: Path,
    small_corpus: Path,
    components: Components,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        index_dir,
        small_corpus,
        pipeline={"pseudo_passage": False},
        llm={"max_new_tokens_answer": 4},
        redis={"url": f"{redis_server.url}/2"},
        feedback={"path": tmp_path / "unused.sqlite"},  # 'auto' picks Redis
    )
    # two gateways (the models shared in process; no answer cache: this is about feedback)
    one, two = create_app(settings, components), create_app(settings, components)
    async with LifespanManager(one) as m1, LifespanManager(two) as m2:
        t1, t2 = httpx.ASGITransport(app=m1.app), httpx.ASGITransport(app=m2.app)
        async with (
            httpx.AsyncClient(transport=t1, base_url="http://t", timeout=120) as c1,
            httpx.AsyncClient(transport=t2, base_url="http://t", timeout=120) as c2,
        ):
            a = await c1.post("/answer", json={"question": QUESTION})
            assert a.status_code == 200, a.text
            # recording is off the request path: the replica that served it writes it first
            state = one.state.gainrag
            await state.feedback.flush()
            r = await c2.post(
                "/v1/feedback", json={"request_id": a.json()["request_id"], "rating": "up"}
            )
            assert r.status_code == 200, r.text
    assert not (tmp_path / "unused.sqlite").exists()
    rows = tmp_path / "rows.jsonl"
    assert (await export(settings, rows)).written == 1
    (row,) = load_questions(rows)
    assert (row["request_id"], row["answers"], row["gold_ids"]) == (
        a.json()["request_id"],
        [a.json()["answer"]],
        cited(a.json()["passages"]),
    )
