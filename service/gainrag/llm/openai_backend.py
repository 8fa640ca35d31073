"""OpenAI-compatible chat backend: vLLM's ``/v1/chat/completions`` (or llama.cpp's server).

Used for both the pseudo-passage and the answer. The server applies the model's chat template
(and may parse special tokens anywhere in the result), so control strings such as
``<|im_start|>`` in the message are neutralised first (:func:`prompts.neutralize_control_text`).
There is no local tokenizer: prompt lengths are checked by the server, not before admission.
Decoding is greedy (temperature 0) like the in-process backend. Batching happens in the server
(vLLM's continuous batching), so concurrent requests are simply sent concurrently over a pooled
connection set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from gainrag import telemetry
from gainrag.config import LLMSettings
from gainrag.errors import UpstreamError
from gainrag.llm.prompts import neutralize_control_text
from gainrag.upstream import Upstream, make_client, malformed


class OpenAIGenerator:
    """A chat model behind an OpenAI-compatible HTTP API."""

    def __init__(self, settings: LLMSettings) -> None:
        if not settings.base_url:
            raise ValueError("the OpenAI backend needs GAINRAG_LLM__BASE_URL")
        headers = {}
        if settings.api_key is not None:
            headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        client = make_client(
            settings.base_url,
            timeout_s=settings.timeout_s,
            max_connections=settings.max_connections,
            headers=headers,
        )
        self.upstream = Upstream(
            "llm", client, connect_retries=settings.connect_retries, uuid_request_ids_only=True
        )
        self.model = settings.model
        self.name = f"openai:{settings.model}"
        # The served name is all we know of the weights; operators pin a real version with
        # GAINRAG_LLM__MODEL_VERSION so cache keys change when the weights do.
        self.version = (
            settings.model_version or hashlib.sha256(settings.model.encode()).hexdigest()[:12]
        )

    def _payload(self, message: str, max_new_tokens: int, stream: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": neutralize_control_text(message)}],
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "stream": stream,
        }

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """Greedy reply to one user message."""
        payload = self._payload(message, max_new_tokens, stream=False)
        body = await self.upstream.request("POST", "/chat/completions", payload)
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise malformed("llm", "no choices[0].message.content") from exc
        if content is None:  # e.g. a reasoning model that spent its budget thinking
            return ""
        if not isinstance(content, str):
            raise malformed("llm", "content is not a string")
        return content

    async def stream(self, message: str, *, max_new_tokens: int) -> AsyncIterator[str]:
        """Greedy reply as text deltas (``"stream": true``, server-sent ``data:`` lines).

        The deltas are the server's, so they concatenate to what :meth:`chat` returns. Closing
        this iterator closes the HTTP response: the server stops decoding for that request.
        An ``error`` object in the stream (a failure after the first byte) is an UpstreamError.
        """
        payload = self._payload(message, max_new_tokens, stream=True)
        lines = self.upstream.stream_lines("POST", "/chat/completions", payload)
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                delta = _delta(data)
                if delta:
                    yield delta
            # The body ended without [DONE]: the server went away mid-reply.
            raise malformed("llm", "the stream ended before [DONE]")
        finally:
            await lines.aclose()

    def prompt_tokens(self, message: str) -> int | None:
        """Unknown here (the server tokenises): None, so nothing is rejected on a guess."""
        return None

    async def close(self) -> None:
        """Close the connection pool."""
        await self.upstream.close()


def _delta(data: str) -> str:
    """The text of one ``chat.completion.chunk`` (empty for role-only and final chunks)."""
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise malformed("llm", "a stream chunk is not JSON") from exc
    if not isinstance(chunk, dict):
        raise malformed("llm", "a stream chunk is not an object")
    error = chunk.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        telemetry.UPSTREAM.labels("llm", "stream_error").inc()
        raise UpstreamError(f"the llm failed mid-reply: {str(message)[:300]}", code="llm_error")
    choices = chunk.get("choices")
    if not choices:
        return ""  # e.g. a usage-only chunk
    try:
        content = choices[0].get("delta", {}).get("content")
    except (AttributeError, IndexError, TypeError) as exc:
        raise malformed("llm", "no choices[0].delta") from exc
    if content is None:
        return ""
    if not isinstance(content, str):
        raise malformed("llm", "delta content is not a string")
    return content
