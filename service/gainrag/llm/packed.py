"""The unit of teacher-forced scoring: one prompt followed by several known replies (token ids).

Its own module because both scorers take it: the packed scorer of :mod:`gainrag.llm.scoring`
and the shared-prefix scorer of :mod:`gainrag.llm.shared_prefix`, which the packed one hands out.
Plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackedReplies:
    """One prompt followed by several replies (token ids), scored as one sequence."""

    prompt: list[int]
    replies: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(a) for a in self.replies)
