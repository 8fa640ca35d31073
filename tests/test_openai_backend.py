"""The OpenAI-compatible LLM client against a real server: llama.cpp's llama-server, on the bundled
SmolLM2 GGUF (the same API vLLM serves)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from gainrag.config import LLMSettings
from gainrag.errors import UnavailableError, UpstreamError, UpstreamTimeoutError
from gainrag.llm import prompts
from gainrag.llm.openai_backend import OpenAIGenerator
from gainrag_harness import Service, free_port, llama_service


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with llama_service(tmp_path_factory.mktemp("llm")) as svc:
        yield svc


def _llm(base_url: str, **kw: object) -> OpenAIGenerator:
    return OpenAIGenerator(LLMSettings(base_url=base_url, model="smollm2-135m", **kw))  # type: ignore[arg-type]


def _upstream(outcome: str) -> float:
    labels = {"upstream": "llm", "outcome": outcome}
    return REGISTRY.get_sample_value("gainrag_upstream_requests_total", labels) or 0.0


async def test_chat_pseudo_and_answer(llm_server: Service) -> None:
    llm = _llm(llm_server.url + "/v1")
    try:
        q = "who got the first nobel prize in physics"
        pseudo = await llm.chat(prompts.pseudo_prompt(q), max_new_tokens=40)
        assert len(pseudo.split()) >= 5
        # (Not compared across calls: llama.cpp reuses the cached prompt prefix, and the Q4
        # numerics of a cached vs. a fresh prefix can flip a greedy token.)
        answer = await llm.chat(prompts.answer_prompt(q, [], 50), max_new_tokens=12)
        assert answer.strip()
        assert llm.name == "openai:smollm2-135m" and len(llm.version) == 12
    finally:
        await llm.close()


async def test_unreachable_server_is_503_after_bounded_retries() -> None:
    llm = _llm(f"http://127.0.0.1:{free_port()}/v1", connect_retries=2)
    before = _upstream("unavailable")
    try:
        with pytest.raises(UnavailableError) as info:
            await llm.chat("hi", max_new_tokens=4)
        assert info.value.status_code == 503 and "unreachable" in info.value.message
        assert _upstream("unavailable") == before + 1  # one failure after the retries
    finally:
        await llm.close()


async def test_timeout_is_504(llm_server: Service) -> None:
    llm = _llm(llm_server.url + "/v1", timeout_s=0.05)
    try:
        with pytest.raises(UpstreamTimeoutError) as info:
            await llm.chat(prompts.pseudo_prompt("tell me about rome"), max_new_tokens=200)
        assert info.value.status_code == 504
    finally:
        await llm.close()


async def test_http_error_is_502_with_the_servers_reason(llm_server: Service) -> None:
    llm = _llm(llm_server.url + "/not-v1")
    try:
        with pytest.raises(UpstreamError) as info:
            await llm.chat("hi", max_new_tokens=4)
        assert info.value.status_code == 502 and "HTTP 404" in info.value.message
    finally:
        await llm.close()
