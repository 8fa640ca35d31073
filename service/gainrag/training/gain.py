"""GainRAG's gain signal: contrastive perplexity of the gold answer with vs. without a passage.

For a candidate passage c, question q and gold answer a = (a_1..a_n):

    logits'_t = (1 + alpha) * logits(a_t | c, q, a_<t) - alpha * logits(a_t | q, a_<t)
    PPL(c)    = exp(mean_t -log softmax(logits'_t)[a_t])

and the signal of c is the minimum PPL over the gold answers. Both prompts are the generator's own
answer-path prompts (with the passage, and closed-book), through its chat template, with the
answer as the assistant's reply. Every answer position of a sequence comes from one forward pass,
and sequences are batched; the LM head is applied only at answer positions (a full-vocabulary
logit tensor for every prompt token would cost ~50 MB per sequence for nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gainrag.llm import prompts
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
    logp = torch.log_softmax(mixed, dim=-1)
    target = torch.as_tensor(list(answer_ids), dtype=torch.long)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    return float(torch.exp(nll.mean()))


@dataclass(frozen=True)
class _Seq:
    prompt: list[int]
    answer: list[int]


class GainScorer:
    """Computes contrastive PPLs with a causal LM (the generator's model and chat template)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        render: Callable[[str], str],
        *,
        batch_size: int = 8,
        max_passage_words: int | None = 200,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.render = render
        self.batch_size = batch_size
        self.max_passage_words = max_passage_words

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        return list(ids)

    def prompt_ids(self, question: str, passage: Passage | None) -> list[int]:
        """Token ids of the answer-path prompt (closed-book when ``passage`` is None)."""
        message = prompts.answer_prompt(
            question, [] if passage is None else [passage], self.max_passage_words
        )
        return self._ids(self.render(message))

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as the assistant's reply."""
        return self._ids(answer.strip())

    @torch.inference_mode()
    def answer_logits(self, seqs: Sequence[_Seq]) -> list[torch.Tensor]:
        """For each sequence, the (len(answer), vocab) float32 logits predicting its answer."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].prompt) + len(seqs[i].answer))
        device = next(self.model.parameters()).device
        decoder = self.model.get_decoder()  # type: ignore[operator]
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        pad = 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows = [seqs[i].prompt + seqs[i].answer for i in idx]
            width = max(len(r) for r in rows)
            # Right padding: real tokens keep positions 0..len-1, and the causal mask means padding
            # after them cannot change their hidden states.
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)] = torch.as_tensor(r)
                mask[b, : len(r)] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
            for b, i in enumerate(idx):
                p, n = len(seqs[i].prompt), len(seqs[i].answer)
                # the hidden state at position p-1+t predicts answer token t
                out[i] = head(hidden[b, p - 1 : p - 1 + n]).float().cpu()
        return [t for t in out if t is not None]

    def passage_ppls(
        self, question: str, passages: Sequence[Passage], answers: Sequence[str], alpha: float
    ) -> list[float]:
        """Contrastive PPL of each passage: the minimum over ``answers``."""
        golds = [a for a in (self.answer_ids(x) for x in answers) if a]
        if not golds:
            raise ValueError(f"no non-empty gold answer for {question!r}")
        base = self.prompt_ids(question, None)
        with_ids = [self.prompt_ids(question, p) for p in passages]
        seqs = [_Seq(base, a) for a in golds] + [_Seq(w, a) for w in with_ids for a in golds]
        logits = self.answer_logits(seqs)
        without = logits[: len(golds)]
        ppls = []
        for i in range(len(passages)):
            row = logits[len(golds) * (i + 1) : len(golds) * (i + 2)]
            ppls.append(
                min(
                    contrastive_ppl(w, wo, a, alpha)
                    for w, wo, a in zip(row, without, golds, strict=True)
                )
            )
        return ppls
