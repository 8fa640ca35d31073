"""The OpenAI-compatible routes with the official ``openai`` SDK as the client, and a streamed
``/answer`` whose client disconnects, against a real gateway process (in-process SmolLM2, the
small test index, API keys on)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gainrag_harness import Service, gainrag_service
from tests.conftest import keyed_gateway_env, keys_file

QUESTION = "who got the first nobel prize in physics"
COUNTING = "Count from 1 to 300, separated by commas."


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return keys_file(tmp_path_factory, "sdk")


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    index_dir: Path,
    small_corpus: Path,
    llm_dir: Path,
    key: tuple[Path, str],
) -> Iterator[Service]:
    env = keyed_gateway_env(index_dir, small_corpus, key[0], pseudo_tokens=8, answer_tokens=48)
    logs = tmp_path_factory.mktemp("gateway")
    with gainrag_service("gateway", ["serve"], logs, env, threads=1) as svc:
        yield svc


@pytest.fixture(scope="module")
def sdk(gateway: Service, key: tuple[Path, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key[1], max_retries=0, timeout=300)


def metric(gateway: Service, name: str, labels: str = "") -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)$"
    m = re.search("^" + pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_models_and_a_completion_with_citations(
    sdk: openai.OpenAI, gateway: Service, key: tuple[Path, str]
) -> None:
    assert [m.id for m in sdk.models.list()] == ["gainrag"]
    completion = sdk.chat.completions.create(
        model="gainrag",
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "an earlier question"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": QUESTION},  # the last user message is the question
        ],
    )
    assert completion.object == "chat.completion" and completion.model == "gainrag"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 50 and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    citations = (completion.model_extra or {})["citations"]
    # The same answer and passages as /answer (greedy, no cache in this deployment).
    r = httpx.post(
        gateway.url + "/answer",
        json={"question": QUESTION},
        headers={"authorization": f"Bearer {key[1]}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert choice.message.content == r.json()["answer"]
    assert citations == r.json()["passages"]


def test_streamed_completion_has_the_role_citations_usage_and_done(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gainrag",
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)  # the SDK stops at data: [DONE]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    citations = (first.model_extra or {})["citations"]
    assert citations and {"id", "title", "text", "score", "pseudo"} <= set(citations[0])
    assert middle and all(c.choices[0].finish_reason is None for c in middle)
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = sdk.chat.completions.create(
        model="gainrag", messages=[{"role": "user", "content": QUESTION}]
    )
    assert streamed == plain.choices[0].message.content
    assert citations == (plain.model_extra or {})["citations"]


def test_errors_reach_the_sdk_in_its_shape(gateway: Service) -> None:
    bad_key = openai.OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad_key.chat.completions.create(
            model="gainrag", messages=[{"role": "user", "content": QUESTION}], stream=True
        )
    assert auth.value.status_code == 401 and auth.value.code == "invalid_key"


def test_validation_errors_come_before_the_first_byte(sdk: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.UnprocessableEntityError) as info:
            sdk.chat.completions.create(
                model="gainrag", messages=[{"role": "system", "content": "hi"}], stream=stream
            )
        assert info.value.code == "no_user_message"
        with pytest.raises(openai.UnprocessableEntityError) as info:
            sdk.chat.completions.create(
                model="gainrag", messages=[{"role": "user", "content": "  "}], stream=stream
            )
        assert info.value.code == "empty_question"


def test_a_disconnect_stops_decoding_and_frees_the_slot(
    gateway: Service, key: tuple[Path, str]
) -> None:
    tokens = "gainrag_llm_generated_tokens_total"
    left = 'outcome="disconnected"'
    before = metric(gateway, "gainrag_streams_total", left)
    start = metric(gateway, tokens)
    with (
        httpx.Client(timeout=300) as client,
        client.stream(
            "POST",
            gateway.url + "/answer",
            json={"question": COUNTING, "stream": True},
            headers={"authorization": f"Bearer {key[1]}"},
        ) as r,
    ):
        assert r.status_code == 200
        seen: list[str] = []
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if seen[-1:] == ["token"]:
                break  # the first token: hang up
    assert seen[0] == "passages"
    deadline = time.monotonic() + 30
    while metric(gateway, "gainrag_streams_total", left) == before:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.1)
    # The decoding step in progress when the stream closed may still finish; then it stops.
    stopped, deadline = metric(gateway, tokens), time.monotonic() + 30
    while True:
        time.sleep(1.0)
        now = metric(gateway, tokens)
        if now == stopped:
            break
        assert time.monotonic() < deadline, "decoding did not stop"
        stopped = now
    time.sleep(1.5)
    assert metric(gateway, tokens) == stopped  # nothing decodes any more
    # The pseudo-passage (8) plus a few answer tokens, of a 48-token answer budget.
    assert stopped - start < 8 + 24
    assert metric(gateway, "gainrag_in_flight", 'route="/answer"') == 0
