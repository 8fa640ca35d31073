"""The gain signal's math on a real small model (SmolLM2-135M)."""

from __future__ import annotations

import math

import pytest
import torch

from gainrag.llm.packed import PackedReplies
from gainrag.pipeline import Components
from gainrag.training.gain import GainScorer, contrastive_ppl
from gainrag.types import Passage

Q = "who got the first nobel prize in physics"
GOOD = Passage(
    "g",
    "Nobel Prize in Physics",
    "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen.",
)
BAD = Passage("b", "Deadpool 2", "Deadpool 2 was released in the United States on May 18, 2018.")


@pytest.fixture(scope="module")
def scorer(components: Components) -> GainScorer:
    gen = components.generator
    return GainScorer(gen.teacher_forced_scorer(batch_size=3))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model(components: Components) -> torch.nn.Module:
    """The generator's causal LM itself, for the unpacked, unbatched references."""
    return components.generator.model  # type: ignore[attr-defined,no-any-return]


def reference_ppl(
    scorer: GainScorer, model: torch.nn.Module, passage: Passage, answer: str, alpha: float
) -> float:
    """Token by token, one full forward pass per answer token and prompt, no batching."""
    with_p = scorer.prompt_ids(Q, passage)
    without = scorer.prompt_ids(Q, None)
    ans = scorer.answer_ids(answer)
    nll = 0.0
    with torch.inference_mode():
        for t in range(len(ans)):
            lw = model(torch.tensor([with_p + ans[:t]])).logits[0, -1].double()
            lo = model(torch.tensor([without + ans[:t]])).logits[0, -1].double()
            mixed = (1 + alpha) * lw - alpha * lo
            nll -= torch.log_softmax(mixed, -1)[ans[t]].item()
    return math.exp(nll / len(ans))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_batched_equals_token_by_token(
    scorer: GainScorer, model: torch.nn.Module, alpha: float
) -> None:
    answer = "Wilhelm Conrad Röntgen"
    got = scorer.passage_ppls(Q, [GOOD, BAD], [answer], alpha)
    want = [reference_ppl(scorer, model, p, answer, alpha) for p in (GOOD, BAD)]
    assert got == pytest.approx(want, rel=1e-4)


def test_alpha_zero_is_plain_conditional_ppl(scorer: GainScorer, model: torch.nn.Module) -> None:
    answer = "Wilhelm Conrad Röntgen"
    prompt, ans = scorer.prompt_ids(Q, GOOD), scorer.answer_ids(answer)
    ids = torch.tensor([prompt + ans])
    labels = torch.tensor([[-100] * len(prompt) + ans])
    with torch.inference_mode():
        loss = model(ids, labels=labels).loss  # HF's mean NLL over labelled tokens
    assert scorer.passage_ppls(Q, [GOOD], [answer], 0.0)[0] == pytest.approx(
        math.exp(loss.item()), rel=1e-4
    )


def test_the_helpful_passage_has_lower_ppl(scorer: GainScorer) -> None:
    good, bad = scorer.passage_ppls(Q, [GOOD, BAD], ["Wilhelm Conrad Röntgen"], 0.5)
    assert good < bad


def test_minimum_over_gold_answers(scorer: GainScorer) -> None:
    answers = ["Wilhelm Conrad Röntgen", "Röntgen", "X-ray man"]
    both = scorer.passage_ppls(Q, [GOOD, BAD], answers, 0.5)
    each = [scorer.passage_ppls(Q, [GOOD, BAD], [a], 0.5) for a in answers]
    # equal up to float noise from different batch padding
    assert both == pytest.approx([min(e[i] for e in each) for i in range(2)], rel=1e-5)
    assert len({round(e[0], 6) for e in each}) == 3  # the answers really differ


def test_padding_does_not_change_logits(scorer: GainScorer) -> None:
    short = PackedReplies(scorer.prompt_ids(Q, None), [scorer.answer_ids("Röntgen")])
    long = PackedReplies(scorer.prompt_ids(Q, GOOD), [scorer.answer_ids("Röntgen")])
    together = scorer.answer_logits([short, long])
    alone = [scorer.answer_logits([s])[0] for s in (short, long)]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_packed_answers_equal_one_sequence_per_answer(
    scorer: GainScorer, model: torch.nn.Module
) -> None:
    # The answers share one prompt in a packed sequence; none may see another.
    prompt = scorer.prompt_ids(Q, GOOD)
    answers = [scorer.answer_ids(a) for a in ("Wilhelm Conrad Röntgen", "Röntgen", "X-ray man")]
    (packed,) = scorer.answer_logits([PackedReplies(prompt, answers)])
    with torch.inference_mode():
        for got, a in zip(packed, answers, strict=True):
            plain = model(torch.tensor([prompt + a])).logits[0]
            want = plain[len(prompt) - 1 : len(prompt) - 1 + len(a)].float()
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_contrastive_ppl_formula_by_hand() -> None:
    # vocab of 2, one answer token (id 0): with = [2, 0], without = [1, 0], alpha = 0.5
    # mixed = 1.5*[2,0] - 0.5*[1,0] = [2.5, 0]; -log softmax[0] = log(1 + e^-2.5)
    w = torch.tensor([[2.0, 0.0]])
    wo = torch.tensor([[1.0, 0.0]])
    assert contrastive_ppl(w, wo, [0], 0.5) == pytest.approx(1 + math.exp(-2.5))
    with pytest.raises(ValueError):
        contrastive_ppl(w, wo, [0, 1], 0.5)
