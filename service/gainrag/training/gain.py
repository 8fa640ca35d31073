"""GainRAG's gain signal: contrastive perplexity of the gold answer with vs. without a passage.

For a candidate passage c, question q and gold answer a = (a_1..a_n):

    logits'_t = (1 + alpha) * logits(a_t | c, q, a_<t) - alpha * logits(a_t | q, a_<t)
    PPL(c)    = exp(mean_t -log softmax(logits'_t)[a_t])

and the signal of c is the minimum PPL over the gold answers. Both prompts are the generator's own
answer-path prompts (with the passage, and closed-book), through its chat template, with the
answer as the assistant's reply. The logits come from the LLM's public teacher-forcing interface
(``gainrag.llm.scoring``), which packs every gold answer after one prompt and batches contexts.

:meth:`GainScorer.score_questions` is the same signal for many questions at once, through the
shared-prefix scorer (``gainrag.llm.shared_prefix``): a passage retrieved for several questions
is computed once, the closed-book baseline once per question, and each pair's logits are reduced
to its PPL as soon as they exist. It also returns the plain (alpha 0) mean NLL of the best gold
answer per candidate and closed-book, the likelihoods the gain is a contrast of.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from gainrag.llm import prompts
from gainrag.llm.packed import PackedReplies
from gainrag.llm.scoring import TeacherForcedScorer
from gainrag.types import Passage


def contrastive_ppl(
    with_passage: torch.Tensor,
    without_passage: torch.Tensor,
    answer_ids: Sequence[int],
    alpha: float,
) -> float:
    """PPL from the (n, vocab) logits that predict each answer token, with and without c."""
    if with_passage.shape != without_passage.shape or with_passage.shape[0] != len(answer_ids):
        raise ValueError("logits must be (len(answer), vocab) for both prompts")
    mixed = (1.0 + alpha) * with_passage.double() - alpha * without_passage.double()
    return math.exp(answer_nll(mixed, answer_ids))


def answer_nll(logits: torch.Tensor, answer_ids: Sequence[int]) -> float:
    """Mean negative log-likelihood of an answer from the (n, vocab) logits that predict it."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    target = torch.as_tensor(list(answer_ids), dtype=torch.long)
    return float(-logp.gather(1, target[:, None]).mean())


@dataclass(frozen=True)
class GainItem:
    """One question to label: its candidates and gold answers."""

    question: str
    passages: Sequence[Passage]
    answers: Sequence[str]


@dataclass(frozen=True)
class GainResult:
    """Per candidate: contrastive PPL and plain mean NLL, each the minimum over the gold answers
    taken on its own (the two minima may come from different answers); the closed-book mean NLL,
    likewise the minimum over the answers."""

    ppls: list[float]
    nlls: list[float]
    nll_closed_book: float


class GainScorer:
    """Contrastive PPLs from a teacher-forced LLM (the generator's weights and chat template)."""

    def __init__(self, llm: TeacherForcedScorer, *, max_passage_words: int | None = 200) -> None:
        self.llm = llm
        self.max_passage_words = max_passage_words

    def prompt_ids(self, question: str, passage: Passage | None) -> list[int]:
        """Token ids of the answer-path prompt (closed-book when ``passage`` is None)."""
        message = prompts.answer_prompt(
            question, [] if passage is None else [passage], self.max_passage_words
        )
        return self.llm.prompt_ids(message)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as the assistant's reply."""
        return self.llm.reply_ids(answer.strip())

    def answer_logits(self, seqs: Sequence[PackedReplies]) -> list[list[torch.Tensor]]:
        """For each sequence and each of its answers, the (len(answer), vocab) float32 logits."""
        return self.llm.reply_logits(seqs)

    def passage_ppls(
        self, question: str, passages: Sequence[Passage], answers: Sequence[str], alpha: float
    ) -> list[float]:
        """Contrastive PPL of each passage: the minimum over ``answers``."""
        golds = [a for a in (self.answer_ids(x) for x in answers) if a]
        if not golds:
            raise ValueError(f"no non-empty gold answer for {question!r}")
        seqs = [PackedReplies(self.prompt_ids(question, None), golds)] + [
            PackedReplies(self.prompt_ids(question, p), golds) for p in passages
        ]
        without, *with_passage = self.answer_logits(seqs)
        return [
            min(
                contrastive_ppl(w, wo, a, alpha)
                for w, wo, a in zip(row, without, golds, strict=True)
            )
            for row in with_passage
        ]

    def score_questions(
        self, items: Sequence[GainItem], alpha: float, *, token_budget: int = 2048
    ) -> list[GainResult]:
        """:meth:`passage_ppls` (plus likelihoods) for many questions, sharing prefixes.

        Needs a scorer with ``shared_prefix`` (the in-process transformers model). Passages are
        grouped by id (a pseudo-passage by its text), so one retrieved for several questions has
        its prompt prefix computed once; the closed-book sequences run first and their logits are
        kept until every pair of their question is reduced.
        """
        shared = self.llm.shared_prefix(token_budget=token_budget)  # type: ignore[attr-defined]
        golds: list[list[list[int]]] = []
        seqs: list[PackedReplies] = []
        groups: list[Hashable | None] = []
        owner: list[tuple[int, int]] = []  # (question, candidate); candidate -1 = closed book
        for qi, item in enumerate(items):
            g = [a for a in (self.answer_ids(x) for x in item.answers) if a]
            if not g:
                raise ValueError(f"no non-empty gold answer for {item.question!r}")
            golds.append(g)
            seqs.append(PackedReplies(self.prompt_ids(item.question, None), g))
            groups.append(None)
            owner.append((qi, -1))
            for ci, p in enumerate(item.passages):
                seqs.append(PackedReplies(self.prompt_ids(item.question, p), g))
                groups.append(("pseudo", p.text) if p.pseudo else ("passage", p.id))
                owner.append((qi, ci))
        closed: dict[int, list[torch.Tensor]] = {}
        pending = [len(it.passages) for it in items]  # pairs left before closed[qi] can go
        ppls = [[float("nan")] * len(it.passages) for it in items]
        nlls = [[float("nan")] * len(it.passages) for it in items]
        closed_nll = [float("nan")] * len(items)

        def sink(i: int, logits: list[torch.Tensor]) -> None:
            qi, ci = owner[i]
            g = golds[qi]
            if ci < 0:
                closed[qi] = logits
                closed_nll[qi] = min(answer_nll(x, a) for x, a in zip(logits, g, strict=True))
                return
            without = closed[qi]  # closed-book sequences are scored first (group None)
            ppls[qi][ci] = min(
                contrastive_ppl(w, wo, a, alpha)
                for w, wo, a in zip(logits, without, g, strict=True)
            )
            nlls[qi][ci] = min(answer_nll(x, a) for x, a in zip(logits, g, strict=True))
            pending[qi] -= 1
            if not pending[qi]:  # full-vocabulary logits: a shard's would not fit in memory
                del closed[qi]

        shared.score(seqs, groups, sink)
        return [GainResult(p, n, c) for p, n, c in zip(ppls, nlls, closed_nll, strict=True)]
