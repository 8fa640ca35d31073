"""Teacher forcing: the logits an LLM assigns to every token of a known reply.

Offline jobs (GainRAG's gain signal) need more from the generator than text: for a prompt and a
gold reply, the full next-token distribution at each reply token. ``TeacherForcedScorer`` is that
interface; a backend implements it with public methods, so training code never reaches into a
backend's model, tokenizer or chat template.

``TransformersTeacherForcedScorer`` is the in-process implementation. One sequence per prompt packs
the prompt with all its replies (a custom attention mask keeps the replies apart), so every reply
position comes from one forward pass and the prompt is computed once; sequences are batched; the
LM head is applied only at reply positions (a full-vocabulary logit tensor for every prompt token
would cost ~50 MB per sequence for nothing). The sequences are :class:`PackedReplies`
(``gainrag.llm.packed``, shared with the shared-prefix scorer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from gainrag.llm.packed import PackedReplies
from gainrag.llm.shared_prefix import SharedPrefixScorer


class TeacherForcedScorer(Protocol):
    """An LLM that scores known replies to chat prompts, token by token."""

    version: str

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of one user message through the chat template, ready for the reply."""
        ...

    def reply_ids(self, reply: str) -> list[int]:
        """Token ids of a text as the assistant's reply."""
        ...

    def reply_logits(self, seqs: Sequence[PackedReplies]) -> list[list[torch.Tensor]]:
        """For each sequence and each of its replies, the (len(reply), vocab) float32 logits
        that predict the reply's tokens (teacher-forced)."""
        ...


def packed_inputs(
    seqs: Sequence[PackedReplies], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, position ids and an additive 4D mask for a batch of packed sequences.

    Each reply attends to the whole prompt and causally to itself, never to the other replies,
    and its positions continue from the prompt: so every reply sees exactly what it would see
    alone after the prompt, while the prompt (~95% of the tokens) is computed once, not once per
    reply. Right padding attends only to itself (a row with nothing to attend would be NaN).
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
        for a in s.replies:
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


class TransformersTeacherForcedScorer:
    """``TeacherForcedScorer`` on a local HF causal LM (shares the generator's weights)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        render: Callable[[str], str],
        *,
        version: str,
        batch_size: int = 8,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._render = render
        self.version = version
        self.batch_size = batch_size

    @property
    def dtype(self) -> str:
        """The weights' torch dtype, e.g. ``bfloat16``."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    def _ids(self, text: str) -> list[int]:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        return list(ids)

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of one user message through the chat template, ready for the reply."""
        return self._ids(self._render(message))

    def reply_ids(self, reply: str) -> list[int]:
        """Token ids of a text as the assistant's reply (the chat template adds nothing here)."""
        return self._ids(reply)

    @torch.inference_mode()
    def reply_logits(self, seqs: Sequence[PackedReplies]) -> list[list[torch.Tensor]]:
        """For each sequence and each of its replies, the (len(reply), vocab) float32 logits."""
        return [[x.cpu() for x in row] for row in self._logits(seqs)]

    def shared_prefix(self, *, token_budget: int = 2048) -> SharedPrefixScorer:
        """This model as a :class:`SharedPrefixScorer` (offline jobs that score many prompts
        sharing passages: each distinct prefix is computed once)."""
        return SharedPrefixScorer(self._model, token_budget=token_budget)

    def trainable_reply_logits(self, seqs: Sequence[PackedReplies]) -> list[list[torch.Tensor]]:
        """As :meth:`reply_logits`, with the autograd graph kept and on the model's device: for
        a generator update (DRO's weighted NLL through a LoRA adapter)."""
        return self._logits(seqs)

    def _logits(self, seqs: Sequence[PackedReplies]) -> list[list[torch.Tensor]]:
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        param = next(self._model.parameters())
        decoder = self._model.get_decoder()  # type: ignore[operator]
        head = self._model.get_output_embeddings()  # type: ignore[operator]
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
                for a in seqs[i].replies:
                    # token t of a reply is predicted by the prompt's last position (t = 0) or
                    # by the reply's own token t-1
                    rows = [p - 1, *range(at, at + len(a) - 1)]
                    out[i].append(head(hidden[b, rows]).float())
                    at += len(a)
        return out
