"""The evaluation generation memo: repeated prompts are answered from the file, on a real LLM."""

from __future__ import annotations

import json
from pathlib import Path

from gainrag.evaluation.memo import MemoGenerator, memo_key
from gainrag.llm import prompts
from gainrag.pipeline import Components


class _KeepOpen:
    """The session's real generator, shielded from close() (other tests still use it)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[attr-defined]
        self.version = inner.version  # type: ignore[attr-defined]

    async def chat(self, message: str, *, max_new_tokens: int) -> str:
        return await self.inner.chat(message, max_new_tokens=max_new_tokens)  # type: ignore[attr-defined]

    async def close(self) -> None:
        return None


async def test_memo_hits_repeats_and_persists(components: Components, tmp_path: Path) -> None:
    path = tmp_path / "memo.jsonl"
    gen = _KeepOpen(components.generator)
    msg = prompts.answer_prompt("who got the first nobel prize in physics", [], None)
    memo = MemoGenerator(gen, path)
    first = await memo.chat(msg, max_new_tokens=8)
    assert await memo.chat(msg, max_new_tokens=8) == first
    assert (memo.hits, memo.misses) == (1, 1)
    await memo.chat(msg, max_new_tokens=4)  # another budget is another generation
    assert memo.misses == 2
    await memo.close()

    # a torn last line (a run killed mid-write) is ignored
    with path.open("a") as f:
        f.write('{"key": "abc", "outp')
    again = MemoGenerator(gen, path)
    assert await again.chat(msg, max_new_tokens=8) == first
    assert (again.hits, again.misses) == (1, 0)
    await again.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()[:2]]
    assert rows[0]["key"] == memo_key(gen.version, msg, 8)
    assert rows[0]["output"] == first and rows[0]["generator"] == gen.version


def test_key_covers_model_prompt_and_budget() -> None:
    k = memo_key("smollm2-135m-float32", "m", 8)
    assert (
        len(
            {
                k,
                memo_key("other", "m", 8),
                memo_key("smollm2-135m-float32", "m2", 8),
                memo_key("smollm2-135m-float32", "m", 9),
            }
        )
        == 4
    )
