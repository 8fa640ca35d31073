"""Streaming: generator deltas (both backends), SSE on /answer (event order, equality with the
non-streaming answer, errors before the first byte, cached answers) on the in-process app with
SmolLM2, and a client disconnect that stops the decoding (a real gateway process, where a
disconnect is a closed socket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from gainrag.api import create_app
from gainrag.config import LLMSettings
from gainrag.errors import UpstreamError
from gainrag.evaluation.memo import MemoGenerator
from gainrag.llm import prompts
from gainrag.llm.interface import stream_reply
from gainrag.llm.openai_backend import OpenAIGenerator
from gainrag.llm.transformers_backend import TransformersGenerator
from gainrag.pipeline import Components
from gainrag_harness import Service, llama_service
from tests.conftest import make_settings
from tests.fake_gateway import MemoryCache
from tests.test_api import assert_error

# Multi-byte characters in the reply (é) exercise the held-back partial characters.
UNICODE_PROMPT = "Write a poem with emoji 🎉 about café in French"
COUNTING = "Count from 1 to 300, separated by commas."


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of an SSE body; data parsed as JSON."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def tokens_generated() -> float:
    return REGISTRY.get_sample_value("gainrag_llm_generated_tokens_total") or 0.0


# --- cleaning as the answer arrives ---------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "  Wilhelm  Röntgen\nMore text",
        "\n \n\tParis \r\nFrance",
        "one line, no break  ",
        "   \n  ",
        "a\u2028b",  # splitlines' other line boundaries count too
        "",
    ],
)
def test_answer_cleaner_pieces_concatenate_to_clean_answer(reply: str) -> None:
    for size in (1, 2, 3, len(reply) or 1):
        cleaner = prompts.AnswerCleaner()
        pieces = [cleaner.feed(reply[i : i + size]) for i in range(0, len(reply), size)]
        pieces.append(cleaner.finish())
        assert "".join(pieces) == prompts.clean_answer(reply)
    done = prompts.AnswerCleaner()
    done.feed("Paris\nand more")
    assert done.complete and done.feed(" ignored") == "" and done.finish() == ""


class _KeepOpen:
    """The session's generator (streaming or not), shielded from close()."""

    def __init__(self, inner: Any, streams: bool) -> None:
        self.inner, self.name, self.version = inner, inner.name, inner.version
        if streams:
            self.stream = inner.stream

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        return str(await self.inner.chat(message, max_new_tokens=max_new_tokens))

    async def close(self) -> None:
        return None


async def test_memo_and_plain_wrappers_stream(components: Components, tmp_path: Path) -> None:
    msg = prompts.answer_prompt("who got the first nobel prize in physics", [], None)
    memo = MemoGenerator(_KeepOpen(components.generator, streams=True), tmp_path / "m.jsonl")
    streamed = "".join([d async for d in memo.stream(msg, max_new_tokens=6)])  # a miss
    assert memo.misses == 1 and streamed
    assert await memo.chat(msg, max_new_tokens=6) == streamed  # recorded
    assert [d async for d in memo.stream(msg, max_new_tokens=6)] == [streamed]  # one delta
    assert memo.hits == 2
    await memo.close()
    # A wrapper without stream(): its whole chat reply is one delta.
    plain = _KeepOpen(components.generator, streams=False)
    assert [d async for d in stream_reply(plain, msg, max_new_tokens=6)] == [streamed]


# --- the in-process engine ---------------------------------------------------------------------


async def test_transformers_deltas_concatenate_to_the_chat_reply(components: Components) -> None:
    g = components.generator
    assert isinstance(g, TransformersGenerator)
    whole = await g.chat(UNICODE_PROMPT, max_new_tokens=16)
    deltas = [d async for d in g.stream(UNICODE_PROMPT, max_new_tokens=16)]
    assert len(deltas) > 3 and all(deltas)  # token by token, never an empty delta
    assert "".join(deltas) == whole
    assert "é" in whole  # the held-back bytes of a multi-byte character came out whole


async def test_transformers_closing_the_stream_stops_decoding(components: Components) -> None:
    g = components.generator
    assert isinstance(g, TransformersGenerator)
    start = tokens_generated()
    agen = g.stream(COUNTING, max_new_tokens=300)
    first = await anext(agen)
    assert first.strip()
    await agen.aclose()
    for _ in range(200):  # the batch in progress notices at its next step
        if not g.batcher._current:
            break
        await asyncio.sleep(0.05)
    assert not g.batcher._current
    stopped = tokens_generated()
    await asyncio.sleep(1.0)
    assert tokens_generated() == stopped  # nothing decodes any more
    assert stopped - start < 20  # of a 300-token budget that counting to 300 would fill


# --- the OpenAI backend against llama.cpp's server -----------------------------------------------


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with llama_service(tmp_path_factory.mktemp("llm")) as svc:
        yield svc


async def test_openai_deltas_concatenate_to_the_chat_reply(llm_server: Service) -> None:
    llm = OpenAIGenerator(LLMSettings(base_url=llm_server.url + "/v1", model="smollm2-135m"))
    try:
        # The first call fills llama.cpp's prompt cache; the compared calls both reuse it (a
        # cached and a fresh prefix can differ in a greedy token under Q4 numerics).
        await llm.chat(UNICODE_PROMPT, max_new_tokens=24)
        whole = await llm.chat(UNICODE_PROMPT, max_new_tokens=24)
        deltas = [d async for d in llm.stream(UNICODE_PROMPT, max_new_tokens=24)]
        assert len(deltas) > 3
        assert "".join(deltas) == whole
    finally:
        await llm.close()


@pytest.mark.servers  # starts its own process
async def test_openai_stream_error_mid_reply_is_a_domain_error(
    tmp_path: Path,
) -> None:
    with llama_service(tmp_path) as server:
        llm = OpenAIGenerator(LLMSettings(base_url=server.url + "/v1", model="smollm2-135m"))
        try:
            # Counting to 300 is ~1200 tokens: seconds of decoding, not all sent yet.
            agen = llm.stream(COUNTING, max_new_tokens=2000)
            assert await anext(agen)
            assert server.proc is not None
            server.proc.kill()  # the server dies mid-reply (no graceful end of the response)
            with pytest.raises(UpstreamError):
                async for _ in agen:
                    pass
        finally:
            await llm.close()


# --- SSE on /answer, in-process ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def client(
    index_dir: Path, small_corpus: Path, components: Components
) -> AsyncIterator[httpx.AsyncClient]:
    # The shared models with a cache of our own, short pseudo-passages.
    comps = Components(components.retriever, components.selector, components.generator)
    comps.cache = MemoryCache()  # type: ignore[assignment]
    settings = make_settings(index_dir, small_corpus, llm={"max_new_tokens_pseudo": 12})
    app = create_app(settings, comps)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as c:
            yield c


async def test_sse_events_order_and_equality_with_the_json_answer(
    client: httpx.AsyncClient,
) -> None:
    q = {"question": "who got the first nobel prize in physics", "return_candidates": True}
    plain = await client.post("/answer", json=q)
    assert plain.status_code == 200, plain.text
    expected = plain.json()
    # no-cache: a fresh computation, compared with the first (greedy, batch of one each).
    r = await client.post(
        "/answer", json={**q, "stream": True}, headers={"cache-control": "no-cache"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-cache"] == "MISS"
    events = parse_sse(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "passages" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"}  # passages before any token, nothing after done
    first, done = events[0][1], events[-1][1]
    assert first["request_id"] == done["request_id"] == r.headers["x-request-id"]
    assert first["selected"] == done["passages"]
    assert first["candidates"] == done["candidates"]
    assert first["pseudo_passage"] == done["pseudo_passage"]
    assert set(first["timings_ms"]) == {"retrieve", "pseudo", "select"}
    assert first["models"] == done["models"] and first["cached"] is False
    # The tokens are the cleaned answer, delta by delta.
    assert "".join(d["text"] for k, d in events if k == "token") == done["answer"]
    # done has the non-streaming shape and the same content.
    assert set(done) == set(expected)
    assert done["answer"] == expected["answer"]
    for key in ("passages", "candidates"):
        assert [(p["id"], p["score"]) for p in done[key]] == [
            (p["id"], p["score"]) for p in expected[key]
        ]
    assert done["pseudo_passage"] == expected["pseudo_passage"]
    assert done["cached"] is False and done["degraded"] == []
    t = done["timings_ms"]
    assert t["generate"] > 0 and t["total"] >= t["generate"] + t["select"]

    # The same question again streams from the cache: one token with the whole answer.
    r = await client.post("/answer", json={**q, "stream": True})
    events = parse_sse(r.text)
    assert r.headers["x-cache"] == "HIT"
    assert [e for e, _ in events] == ["passages", "token", "done"]
    assert events[0][1]["cached"] is True and events[0][1]["selected"] == done["passages"]
    assert events[1][1] == {"text": expected["answer"]}
    assert events[2][1]["cached"] is True and events[2][1]["answer"] == expected["answer"]


async def test_accept_header_streams_and_errors_before_the_first_byte_keep_their_status(
    client: httpx.AsyncClient,
) -> None:
    sse_accept = {"accept": "text/event-stream"}
    r = await client.post("/answer", json={"question": "   "}, headers=sse_accept)
    assert_error(r, 422, "empty_question")
    r = await client.post("/answer", json={"question": "who", "stream": True, "top_n": 99})
    assert_error(r, 422, "top_n_out_of_range")
    r = await client.post("/answer", json={"question": "who", "stream": "yes"})
    assert r.status_code == 422 and set(r.json()) == {"error"}
