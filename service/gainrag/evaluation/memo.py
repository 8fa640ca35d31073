"""A persistent memo of LLM generations for evaluation runs.

Decoding is greedy, so a prompt's output is a function of (generator version, prompt, token
budget): presets that give the generator the same passage, and the pseudo-passage of a question,
need not be generated again by a later run. Evaluating five presets on CPU is dominated by
generation, and most prompts repeat across presets (the top passage often wins under several
selectors). Batched decoding can differ from unbatched decoding in the last float bits, so a
memoised output is one that the same model could have produced in another batch; the answer is
otherwise unchanged. For evaluation only: the service's answer cache is a separate component.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

from gainrag.llm.interface import Generator, prompt_tokens, stream_reply


def memo_key(version: str, message: str, max_new_tokens: int) -> str:
    """The entry's key: everything that decides a greedy generation."""
    h = hashlib.sha256(f"{version}\0{max_new_tokens}\0{message}".encode())
    return h.hexdigest()


class MemoGenerator:
    """Wraps a generator; answers repeated prompts from a JSONL file and appends new ones."""

    def __init__(self, inner: Generator, path: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.version = inner.version
        self.path = path
        self.hits = 0
        self.misses = 0
        self._memo: dict[str, str] = {}
        if path.exists():
            with path.open(encoding="utf-8") as f:
                for line in f:
                    # a torn last line (a run killed mid-write) is skipped, not fatal
                    try:
                        row = json.loads(line)
                        self._memo[row["key"]] = row["output"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write() per line in append mode: concurrent eval processes do not interleave lines.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        """The memoised output, or a real generation that is then recorded."""
        key = memo_key(self.version, message, max_new_tokens)
        if key in self._memo:
            self.hits += 1
            return self._memo[key]
        out = await self.inner.chat(message, max_new_tokens=max_new_tokens)
        self._record(key, out)
        return out

    async def stream(self, message: str, *, max_new_tokens: int) -> AsyncIterator[str]:
        """The memoised output as one delta, or the wrapped generator's deltas; a reply streamed
        to its end is recorded like :meth:`chat`'s (one abandoned midway is not)."""
        key = memo_key(self.version, message, max_new_tokens)
        if key in self._memo:
            self.hits += 1
            if self._memo[key]:
                yield self._memo[key]
            return
        parts = []
        async for delta in stream_reply(self.inner, message, max_new_tokens=max_new_tokens):
            parts.append(delta)
            yield delta
        self._record(key, "".join(parts))

    def _record(self, key: str, out: str) -> None:
        self.misses += 1
        self._memo[key] = out
        line = json.dumps({"key": key, "generator": self.version, "output": out}) + "\n"
        os.write(self._fd, line.encode())

    def prompt_tokens(self, message: str) -> int | None:
        """The wrapped generator's prompt length (the pipeline checks budgets with it)."""
        return prompt_tokens(self.inner, message)

    async def close(self) -> None:
        """Close the file and the wrapped generator."""
        os.close(self._fd)
        await self.inner.close()
