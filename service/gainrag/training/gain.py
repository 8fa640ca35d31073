"""GainRAG's gain signal: contrastive perplexity of the gold answer with vs. without a passage.

For a candidate passage c, question q and gold answer a = (a_1..a_n):

    logits'_t = (1 + alpha) * logits(a_t | c, q, a_<t) - alpha * logits(a_t | q, a_<t)
    PPL(c)    = exp(mean_t -log softmax(logits'_t)[a_t])

and the signal of c is the minimum PPL over the gold answers. Both prompts are the generator's own
answer-path prompts (with the passage, and closed-book), through its chat template, with the
answer as the assistant's reply. One sequence per context packs the prompt with all gold answers
(a custom attention mask keeps the answers apart), so every answer position comes from one forward
pass and the prompt is computed once; sequences are batched; the LM head is applied only at
answer positions (a full-vocabulary logit tensor for every prompt token would cost ~50 MB per
sequence for nothing).
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
    """One context (prompt) followed by every gold answer, packed into one sequence."""

    prompt: list[int]
    answers: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(a) for a in self.answers)


def packed_inputs(
    seqs: Sequence[_Seq], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, position ids and an additive 4D mask for a batch of packed sequences.

    Each answer attends to the whole prompt and causally to itself, never to the other answers,
    and its positions continue from the prompt: so every answer sees exactly what it would see
    alone after the prompt, while the prompt (~95% of the tokens) is computed once, not once per
    gold answer. Right padding attends only to itself (a row with nothing to attend would be NaN).
    """
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    allowed = torch.zeros((len(seqs), width, width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        p = len(s.prompt)
        ids[b, :p] = torch.as_tensor(s.prompt)
        pos[b, :p] = torch.arange(p)
        allowed[b, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        at = p
        for a in s.answers:
            n = len(a)
            ids[b, at : at + n] = torch.as_tensor(a)
            pos[b, at : at + n] = torch.arange(p, p + n)
            allowed[b, at : at + n, :p] = True
            allowed[b, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
        idx = torch.arange(at, width)
        allowed[b, idx, idx] = True
    mask = torch.zeros((len(seqs), 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, pos, mask


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
    def answer_logits(self, seqs: Sequence[_Seq]) -> list[list[torch.Tensor]]:
        """For each sequence and each of its answers, the (len(answer), vocab) float32 logits."""
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        param = next(self.model.parameters())
        decoder = self.model.get_decoder()  # type: ignore[operator]
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, pos, mask = packed_inputs([seqs[i] for i in idx], param.dtype)
            hidden = decoder(
                input_ids=ids.to(param.device),
                position_ids=pos.to(param.device),
                attention_mask=mask.to(param.device),
            )[0]
            for b, i in enumerate(idx):
                p = len(seqs[i].prompt)
                at = p
                for a in seqs[i].answers:
                    # token t of an answer is predicted by the prompt's last position (t = 0) or
                    # by the answer's own token t-1
                    rows = [p - 1, *range(at, at + len(a) - 1)]
                    out[i].append(head(hidden[b, rows]).float().cpu())
                    at += len(a)
        return out

    def passage_ppls(
        self, question: str, passages: Sequence[Passage], answers: Sequence[str], alpha: float
    ) -> list[float]:
        """Contrastive PPL of each passage: the minimum over ``answers``."""
        golds = [a for a in (self.answer_ids(x) for x in answers) if a]
        if not golds:
            raise ValueError(f"no non-empty gold answer for {question!r}")
        seqs = [_Seq(self.prompt_ids(question, None), golds)] + [
            _Seq(self.prompt_ids(question, p), golds) for p in passages
        ]
        without, *with_passage = self.answer_logits(seqs)
        return [
            min(
                contrastive_ppl(w, wo, a, alpha)
                for w, wo, a in zip(row, without, golds, strict=True)
            )
            for row in with_passage
        ]
