"""RADIO and DRO: their math against hand-computed cases, and each recipe end to end on a slice."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gainrag.cli import main
from gainrag.config import REPO_ROOT, Settings
from gainrag.errors import ConfigurationError
from gainrag.llm.lora import LoraSpec
from gainrag.llm.transformers_backend import TransformersGenerator
from gainrag.retrieval.encoder import BiEncoder
from gainrag.training.dro import (
    generator_loss,
    log_evidence,
    merged_weights,
    mstep_loss,
    normalized_weights,
    pl_log_prob,
    sample_prefixes,
    weight_variance,
)
from gainrag.training.dro_loop import (
    DroQuestion,
    DroSettings,
    GeneratorUpdate,
    ReaderLikelihood,
    train_dro,
)
from gainrag.training.radio import (
    NEGATIVE_RANKS,
    group_indices,
    minmax,
    mix,
    radio_group,
    rationale_prompt,
    rerank,
)
from gainrag.training.recipes.base import TrainArgs
from gainrag.training.recipes.dro import RECIPE as DRO
from gainrag.types import Passage

WARM = REPO_ROOT / "models/selector/relevance-minilm-l6"

# ---------------------------------------------------------------- RADIO


def test_minmax_maps_to_the_unit_interval() -> None:
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax([-1.0, 1.0, 0.0, 0.5]) == [0.0, 1.0, 0.5, 0.75]
    assert minmax([5.0, 5.0]) == [0.0, 0.0]  # nothing to rank by: no division by zero


def test_mixing_and_re_ranking_by_alpha() -> None:
    rationale = [0.0, 2.0, 1.0]  # minmax: 0, 1, 0.5 (exact in binary)
    retrieval = [10.0, 8.0, 9.0]  # minmax: 1, 0, 0.5
    assert mix(rationale, retrieval, 0.3) == pytest.approx([0.7, 0.3, 0.5])
    assert mix(rationale, retrieval, 0.7) == pytest.approx([0.3, 0.7, 0.5])
    assert mix(rationale, retrieval, 1.0) == [0.0, 1.0, 0.5]  # without the retrieval score
    assert mix(rationale, retrieval, 0.0) == [1.0, 0.0, 0.5]  # the retrieval order
    assert rerank(mix(rationale, retrieval, 0.3)) == [0, 2, 1]
    assert rerank(mix(rationale, retrieval, 0.7)) == [1, 2, 0]
    assert rerank(mix(rationale, retrieval, 0.5)) == [0, 1, 2]  # a three-way tie: stable
    with pytest.raises(ValueError):
        mix(rationale, retrieval, 1.5)


def test_group_ranks_and_short_lists() -> None:
    assert NEGATIVE_RANKS == (3, 4, 6, 9, 13, 18)
    assert group_indices(list(range(20))) == (0, [3, 4, 6, 9, 13, 18])
    rev = list(range(19, -1, -1))
    assert group_indices(rev) == (19, [16, 15, 13, 10, 6, 1])
    assert group_indices(list(range(19))) == (0, [3, 4, 6, 9, 13, 18])  # 19 is enough
    assert group_indices(list(range(18))) == (0, [3, 4, 6, 9, 13])  # rank 18 is missing
    assert group_indices(list(range(10))) == (0, [3, 4, 6, 9])
    assert group_indices(list(range(4))) == (0, [3])
    assert group_indices(list(range(3))) is None  # no negative rank exists


def test_radio_group_from_a_rationales_row() -> None:
    cands = [
        {"title": f"t{i}", "text": f"x{i}", "retrieval_score": 1.0 - 0.1 * i, "rationale_score": r}
        for i, r in enumerate([0.1, 0.2, 0.9, 0.3, 0.4, 0.0])
    ]
    row = {"question": "q", "candidates": cands}
    # alpha 1: rationale order 2, 4, 3, 1, 0, 5 -> positive 2, negatives at ranks 3, 4
    assert radio_group(row, 1.0) == {"query": "q", "pos": ["t2\nx2"], "neg": ["t1\nx1", "t0\nx0"]}
    # alpha 0: the retrieval order -> positive 0, negatives 3, 4
    assert radio_group(row, 0.0) == {"query": "q", "pos": ["t0\nx0"], "neg": ["t3\nx3", "t4\nx4"]}
    assert radio_group({"question": "q", "candidates": cands[:3]}, 0.5) is None


def test_rationale_prompt_is_radios() -> None:
    p = rationale_prompt("who?", "him")
    assert p.startswith("You are a professional QA assistant. Given a question and the ground")
    assert p.endswith("\n\nQuestion: who?\nAnswer: him\nRationale: ")


# ---------------------------------------------------------------- DRO


def test_plackett_luce_log_probability_of_a_prefix() -> None:
    s = torch.tensor([1.0, 2.0, 3.0])
    e1, e2, e3 = math.exp(1), math.exp(2), math.exp(3)
    # pick 2 first (of all three), then 0 (of 0, 1)
    expected = (3 - math.log(e1 + e2 + e3)) + (1 - math.log(e1 + e2))
    assert float(pl_log_prob(s, [2, 0])) == pytest.approx(expected, abs=1e-6)
    assert float(pl_log_prob(s, [2, 0])) == pytest.approx(-1.7208677, abs=1e-6)
    assert float(pl_log_prob(s, [2, 0, 1])) == pytest.approx(expected, abs=1e-6)  # last is sure
    assert float(pl_log_prob(s, [1])) == pytest.approx(2 - math.log(e1 + e2 + e3), abs=1e-6)
    # temperature 2: scores halved
    h1, h2, h3 = math.exp(0.5), math.exp(1.0), math.exp(1.5)
    expected_t2 = (0.5 - math.log(h1 + h2 + h3)) + (1.0 - math.log(h2 + h3))
    assert float(pl_log_prob(s, [0, 1], 2.0)) == pytest.approx(expected_t2, abs=1e-6)
    # the full orderings are a distribution
    total = sum(math.exp(float(pl_log_prob(s, list(z)))) for z in permutations(range(3)))
    assert total == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        pl_log_prob(s, [1, 1])


def test_gumbel_top_n_samples_follow_plackett_luce() -> None:
    s = torch.tensor([0.0, 1.0, 2.0])
    draws = sample_prefixes(s, 2, 40_000, 1.5, torch.Generator().manual_seed(0))
    assert all(len(z) == 2 and z[0] != z[1] for z in draws)
    for z in permutations(range(3), 2):
        freq = sum(1 for d in draws if tuple(d) == z) / len(draws)
        assert freq == pytest.approx(math.exp(float(pl_log_prob(s, list(z), 1.5))), abs=0.01)
    again = sample_prefixes(s, 2, 5, 1.5, torch.Generator().manual_seed(0))
    assert again == draws[:5]  # seeded


def test_self_normalised_weights_are_stable() -> None:
    w = normalized_weights([math.log(0.2), math.log(0.6), math.log(0.2)])
    assert w.tolist() == pytest.approx([0.2, 0.6, 0.2])
    # far below exp's range: exp(-1e4) is 0.0 in float64, the weights are still right
    w = normalized_weights([-10_000.0, -10_000.0 + math.log(3.0)])
    assert w.tolist() == pytest.approx([0.25, 0.75])
    w = normalized_weights([-1000.0, -1001.0, -1000.0])
    z = 2 + math.exp(-1)
    assert w.tolist() == pytest.approx([1 / z, math.exp(-1) / z, 1 / z])
    assert normalized_weights([-3.0]).tolist() == [1.0]
    assert weight_variance(torch.tensor([0.25, 0.75])) == pytest.approx(0.0625)
    assert weight_variance(torch.tensor([1.0])) == 0.0
    assert log_evidence([math.log(0.2), math.log(0.4)]) == pytest.approx(math.log(0.3))
    shifted = log_evidence([-5000 + math.log(0.2), -5000 + math.log(0.4)])
    assert shifted == pytest.approx(-5000 + math.log(0.3))


def test_one_m_step_raises_the_probability_of_the_likeliest_sample() -> None:
    # a toy selector: one free score per candidate
    scores = torch.nn.Parameter(torch.tensor([0.5, 0.2, 0.0, -0.3]))
    samples = [[0, 1], [2, 3], [1, 2]]
    lls = [-5.0, -1.0, -3.0]  # the reader likes [2, 3] best
    w = normalized_weights(lls)
    before = [float(pl_log_prob(scores.detach(), z)) for z in samples]
    loss = mstep_loss(scores, samples, w)
    loss.backward()
    with torch.no_grad():
        scores -= 0.5 * scores.grad  # type: ignore[operator]
    after = [float(pl_log_prob(scores.detach(), z)) for z in samples]
    assert after[1] > before[1]
    assert after[0] < before[0]  # the unlikely sample loses mass
    # hand-checked gradient of one sample: d/ds_i [-log PL([2])] = softmax(s)_i - 1{i = 2}
    s = torch.nn.Parameter(torch.tensor([0.5, 0.2, 0.0, -0.3]))
    mstep_loss(s, [[2]], [1.0]).backward()
    expected = torch.softmax(s.detach(), 0) - torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert torch.allclose(s.grad, expected)  # type: ignore[arg-type]


def test_the_n1_group_loss_is_the_m_step_loss() -> None:
    s = torch.tensor([0.3, -0.2, 1.0, 0.1])
    samples, w = [[2], [0], [2], [3]], [0.4, 0.1, 0.3, 0.2]
    summed = torch.tensor([0.1, 0.0, 0.7, 0.2])  # per-candidate sums of the weights
    assert float(DRO.group_loss(s, summed)) == pytest.approx(float(mstep_loss(s, samples, w)))


def test_generator_loss_is_the_weighted_nll_over_distinct_selections() -> None:
    samples = [[2, 0], [1, 0], [2, 0], [3, 1]]
    w = [0.1, 0.2, 0.3, 0.4]
    merged = merged_weights(samples, w)
    assert [z for z, _ in merged] == [(2, 0), (1, 0), (3, 1)]  # first-drawn order
    assert [x for _, x in merged] == pytest.approx([0.4, 0.2, 0.4])
    ll = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    loss = generator_loss(ll, [x for _, x in merged])
    assert loss.item() == pytest.approx(0.4 * 1 + 0.2 * 2 + 0.4 * 4)
    loss.backward()
    assert ll.grad.tolist() == pytest.approx([-0.4, -0.2, -0.4])  # type: ignore[union-attr]
    # the weights are constants of the M-step: no gradient flows into them
    weights = torch.tensor([0.5, 0.5], requires_grad=True)
    out = generator_loss(torch.tensor([-1.0, -2.0]), weights)
    assert float(out) == pytest.approx(1.5) and not out.requires_grad


_FR = [
    Passage("a", "Paris", "Paris is the capital of France."),
    Passage("b", "Berlin", "Berlin is the capital of Germany."),
]


def test_one_generator_step_raises_the_likelihood_under_the_weighted_selection(
    llm_dir: Path, tmp_path: Path
) -> None:
    """DRO's generator M-step on the real (tiny) reader: one step of the weighted NLL with all
    weight on selection [1] makes the gold answer likelier given that selection; only the LoRA
    weights move; the saved adapter, merged by the serving backend, scores the same."""
    gen = TransformersGenerator(llm_dir, dtype="float32")
    reader = ReaderLikelihood(gen.teacher_forced_scorer(), max_passage_words=30)
    q = DroQuestion("what is the capital of france", ["Paris"], _FR)
    base = reader.log_likelihoods([(q, [0]), (q, [1])])
    frozen = {k: v.clone() for k, v in gen.model.state_dict().items()}
    torch.manual_seed(0)
    adapter = gen.attach_lora(LoraSpec(rank=4, alpha=8))
    # LoRA starts as the identity (B = 0): the reader is unchanged until a step is taken
    assert reader.log_likelihoods([(q, [0]), (q, [1])]) == pytest.approx(base, abs=1e-5)
    opt = torch.optim.SGD(adapter.parameters(), lr=1e-2)
    ll = reader.trainable_log_likelihoods([(q, [0]), (q, [1])])
    assert ll.tolist() == pytest.approx(base, abs=1e-4)
    generator_loss(ll, [0.0, 1.0]).backward()
    opt.step()
    after = reader.log_likelihoods([(q, [0]), (q, [1])])
    assert after[1] > base[1] + 1e-3
    # peft moves a wrapped layer's weight to "<layer>.base_layer.weight"
    now = {
        k.replace(".base_layer", ""): v
        for k, v in gen.model.state_dict().items()
        if "lora_" not in k
    }
    assert now.keys() == frozen.keys()
    moved = [k for k, v in now.items() if not torch.equal(v, frozen[k])]
    assert moved == []  # the base weights are frozen; the adapter holds the update
    adapter.save(tmp_path / "lora")
    assert sorted(x.name for x in (tmp_path / "lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    served = TransformersGenerator(llm_dir, dtype="float32", lora_adapter=tmp_path / "lora")
    assert served.version.startswith(gen.version.split("+")[0] + "+lora-")
    merged = ReaderLikelihood(served.teacher_forced_scorer(), max_passage_words=30)
    assert merged.log_likelihoods([(q, [0]), (q, [1])]) == pytest.approx(after, abs=1e-4)


def test_lora_adapter_setting_picks_the_in_process_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gainrag.wiring import build_llm, llm_backend

    monkeypatch.setenv("GAINRAG_LLM__LORA_ADAPTER", str(tmp_path / "lora"))
    monkeypatch.setenv("GAINRAG_LLM__BACKEND", "auto")
    assert llm_backend(Settings()) == "transformers"
    monkeypatch.setenv("GAINRAG_LLM__BACKEND", "llamacpp")
    with pytest.raises(ConfigurationError, match="LORA_ADAPTER"):
        build_llm(Settings())
    monkeypatch.setenv("GAINRAG_LLM__BACKEND", "transformers")
    monkeypatch.setenv("GAINRAG_LLM__MODEL", "smollm2-135m")
    with pytest.raises(ConfigurationError, match="no LoRA adapter"):
        build_llm(Settings())


# ---------------------------------------------------------------- end to end


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, index_dir: Path, small_corpus: Path, llm_dir: Path
) -> None:
    monkeypatch.setenv("GAINRAG_RETRIEVAL__INDEX_DIR", str(index_dir))


def test_radio_end_to_end(
    env: None,
    encoder: BiEncoder,
    tmp_path: Path,
    dev_questions: list[dict],
    capsys: pytest.CaptureFixture[str],
) -> None:
    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:2]))
    out = tmp_path / "rationales.jsonl"
    job = ["train", "rationales", "--questions", str(qfile), "--k", "6"]
    job += ["--max-new-tokens", "12", "--output", str(out)]
    assert main([*job, "--shard", "1/2"]) == 0
    assert main([*job, "--shard", "0/2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(str(q["id"]) for q in dev_questions[:2])
    for row in rows:
        assert row["rationale"] and row["answer"] == row["answers"][0].strip()
        assert [c["retrieval_rank"] for c in row["candidates"]] == list(range(6))
        # the dot product of "question answer rationale" with each passage, both embedded
        q = encoder.encode([f"{row['question']} {row['answer']} {row['rationale']}"])[0]
        p = encoder.encode([f"{c['title']}\n{c['text']}" for c in row["candidates"]])
        got = [c["rationale_score"] for c in row["candidates"]]
        assert got == pytest.approx((p @ q).tolist(), abs=1e-4)
    capsys.readouterr()
    assert main(job) == 0  # resumable: nothing left to do
    assert "0 written, 2 already done" in capsys.readouterr().out

    ckpt = tmp_path / "radio"
    train = ["train", "radio", "--rationales", str(out), "--alpha", "0.7", "--init", str(WARM)]
    assert main([*train, "--max-length", "64", "--epochs", "1", "--out", str(ckpt)]) == 0
    assert "radio: 2 groups (sizes [3])" in capsys.readouterr().out  # k = 6: ranks 3 and 4
    meta = json.loads((ckpt / "gainrag_training.json").read_text())
    assert meta["recipe"] == "radio" and meta["config"]["loss"] == "infonce"
    assert meta["inputs"]["alpha"] == 0.7 and meta["steps"] == 2


def test_dro_end_to_end(
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    dev_questions: list[dict],
    capsys: pytest.CaptureFixture[str],
) -> None:
    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:2]))
    ckpt = tmp_path / "dro"
    monkeypatch.setenv("GAINRAG_LLM__MAX_PASSAGE_WORDS", "30")  # short prompts: a fast test
    # k = 2, top-2: the two orders of both passages (2 reader passes per question and E-step)
    args = ["train", "dro", "--questions", str(qfile), "--k", "2", "--top-n", "2"]
    args += ["--samples", "4", "--rounds", "2", "--init", str(WARM), "--max-length", "64"]
    args += ["--generator-lora", "--lora-rank", "4"]  # the reader is trained too
    assert main([*args, "--out", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "dro round 1:" in out and "dro round final:" in out and "generator loss" in out
    meta = json.loads((ckpt / "gainrag_training.json").read_text())
    assert meta["recipe"] == "dro" and meta["config"]["loss"] == "weighted-plackett-luce"
    assert meta["dro"] == {"top_n": 2, "samples": 4, "temperature": 1.0, "rounds": 2}
    assert [r["round"] for r in meta["rounds"]] == [1, 2] and meta["steps"] == 4
    assert all(r["generator_loss"] > 0 for r in meta["rounds"])
    lora = meta["generator_update"]
    assert lora["rank"] == 4 and lora["targets"] == ["q_proj", "v_proj"]
    assert lora["loss"] == "weighted-nll" and lora["adapter"] == "generator-lora"
    assert meta["inputs"]["generator_lora"] is True
    # the adapter serves: the in-process backend merges it, its hash goes into the version
    monkeypatch.setenv("GAINRAG_LLM__LORA_ADAPTER", str(ckpt / "generator-lora"))
    from gainrag.wiring import build_llm

    served = build_llm(Settings())
    # the record names the served version, so a served answer leads back to its training run
    assert served.version.endswith(lora["served_version"]) and lora["served_version"] != "+lora-"
    asyncio.run(served.close())
    for record in [*meta["rounds"], meta["final"]]:
        assert set(record["log_evidence"]) == {"1", "4", "8"}
        assert all(v < 0 and math.isfinite(v) for v in record["log_evidence"].values())
        assert record["weight_variance"]["1"] == 0.0 and record["ess"]["1"] == 1.0
        assert 1.0 <= record["ess"]["8"] <= 8.0
    from gainrag.selector.cross_encoder import CrossEncoderScorer  # the checkpoint serves

    scores = CrossEncoderScorer(ckpt, dtype="float32").score_pairs([("q", "a\nb"), ("q", "c\nd")])
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores)


class _PositionReader(ReaderLikelihood):
    """A deterministic stand-in for the reader: the answer is likelier the earlier passage 0 sits
    in the selection. The loop's resume does not depend on what the reader is."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def log_likelihoods(self, items: Sequence[tuple[DroQuestion, Sequence[int]]]) -> list[float]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the job is stopped mid-run
        return [-1.0 - (list(z).index(0) if 0 in z else 5) for _, z in items]


def test_dro_resumes_after_an_interrupted_round_to_the_same_weights(tmp_path: Path) -> None:
    """An interruption after round 1 and a rerun give the weights of an uninterrupted run."""
    passages = [Passage(id=f"p{i}", title=f"T{i}", text=f"text number {i}") for i in range(4)]
    questions = [DroQuestion(f"question {j}?", ["a"], passages) for j in range(3)]
    args = TrainArgs(max_length=32, epochs=1)
    cfg = DroSettings(top_n=2, samples=4, rounds=2)
    whole = tmp_path / "whole"
    train_dro(WARM, questions, _PositionReader(), whole, args, cfg, show_progress=False)
    resumed = tmp_path / "resumed"
    # one E-step call per round (3 questions fit one chunk): the 2nd call is round 2's E-step
    with pytest.raises(KeyboardInterrupt):
        train_dro(
            WARM,
            questions,
            _PositionReader(fail_on_call=2),
            resumed,
            args,
            cfg,
            show_progress=False,
        )
    assert [p.name for p in (tmp_path / "resumed.work").glob("round-*.pt")] == ["round-0.pt"]
    meta = train_dro(WARM, questions, _PositionReader(), resumed, args, cfg, show_progress=False)
    assert [r["round"] for r in meta["rounds"]] == [1, 2]
    a = load_file(whole / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.work").exists()


class _StoppedReader(ReaderLikelihood):
    """The real reader, stopped (as by Ctrl-C) at its ``fail_on_call``-th E-step call."""

    def __init__(self, gen: TransformersGenerator, fail_on_call: int | None = None) -> None:
        super().__init__(gen.teacher_forced_scorer(), max_passage_words=20)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def log_likelihoods(self, items: Sequence[tuple[DroQuestion, Sequence[int]]]) -> list[float]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        return super().log_likelihoods(items)


def test_dro_with_the_generator_update_resumes_to_the_same_adapter(
    llm_dir: Path, tmp_path: Path
) -> None:
    """Selector and reader trained together; an interruption after round 1 and a rerun give the
    adapter and selector of an uninterrupted run; a rerun without the update is refused."""
    questions = [
        DroQuestion("what is the capital of france", ["Paris"], _FR),
        DroQuestion("what is the capital of germany", ["Berlin"], _FR),
    ]
    args = TrainArgs(max_length=32, epochs=1)
    cfg = DroSettings(top_n=1, samples=4, rounds=2)

    def run(out: Path, fail_on_call: int | None = None) -> dict:
        gen = TransformersGenerator(llm_dir, dtype="float32")
        torch.manual_seed(0)
        update = GeneratorUpdate(gen.attach_lora(LoraSpec(rank=4, alpha=8)), lr=1e-3)
        reader = _StoppedReader(gen, fail_on_call)
        return train_dro(
            WARM, questions, reader, out, args, cfg, show_progress=False, generator=update
        )

    meta = run(tmp_path / "whole")
    assert [r["round"] for r in meta["rounds"]] == [1, 2]
    assert all(math.isfinite(r["generator_loss"]) for r in meta["rounds"])
    adapter = load_file(tmp_path / "whole" / "generator-lora" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", fail_on_call=2)  # round 2's E-step
    with pytest.raises(ValueError, match="with the generator update"):
        train_dro(
            WARM, questions, _PositionReader(), tmp_path / "resumed", args, cfg, show_progress=False
        )
    resumed = run(tmp_path / "resumed")
    assert resumed["generator_update"]["fingerprint"] == meta["generator_update"]["fingerprint"]
    for name in ("generator-lora/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
