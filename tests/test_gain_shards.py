"""Shared-prefix teacher forcing (exact against unshared scoring) and the gain-shards job."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from gainrag.cli import main
from gainrag.llm import shared_prefix
from gainrag.llm.packed import PackedReplies
from gainrag.llm.shared_prefix import SharedPrefixScorer, plan_prefixes
from gainrag.pipeline import Components
from gainrag.training.gain import GainItem, GainScorer
from gainrag.training.signals.gain_shards import (
    cluster_shards,
    commit_pending,
    commit_shard,
    expand_rows,
)
from gainrag.types import PSEUDO_ID, Passage

Q1 = "who got the first nobel prize in physics"
Q2 = "when was the first nobel prize in physics awarded"
GOOD = Passage(
    "g",
    "Nobel Prize in Physics",
    "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, a German "
    "physicist, for his discovery of X-rays.",
)
BAD = Passage("b", "Deadpool 2", "Deadpool 2 was released in the United States on May 18, 2018.")
PSEUDO = Passage(PSEUDO_ID, "", "Röntgen discovered X-rays in 1895.", True)


def test_plan_shares_the_root_and_passages_seen_twice() -> None:
    head, p1, p2 = [1, 2, 3], [10] * 20, [11] * 20
    seqs = [
        PackedReplies([*head, 5, 6], [[7]]),  # closed book
        PackedReplies(head + p1 + [8], [[7]]),
        PackedReplies(head + p1 + [9], [[7]]),
        PackedReplies(head + p2 + [8], [[7]]),  # its passage is seen once: no node
    ]
    plan = plan_prefixes(seqs, [None, "p1", "p1", "p2"])
    assert plan.root == 3
    assert plan.nodes == [(1, 23)] and plan.node_of == [None, 0, 0, None]
    # root 3 + node 20 + leaves (3 + 2 + 2 + 22) instead of 6 + 25 + 25 + 25
    assert plan.tokens(seqs) == 52 and sum(map(len, seqs)) == 81
    # too little shared beyond the root: no node
    short = [PackedReplies(head + [10] * 5 + [8], [[7]]), PackedReplies(head + [10] * 5, [[7]])]
    assert plan_prefixes(short, ["p", "p"]).nodes == []
    # identical prompts still keep one token each (it predicts the first reply token)
    same = [PackedReplies(head + p1, [[7]]), PackedReplies(head + p1, [[8]])]
    plan = plan_prefixes(same, ["p", "p"])
    assert plan.root == 22 and plan.nodes == [] and plan.tokens(same) == 22 + 2 * 2
    with pytest.raises(ValueError, match="prompt token"):
        plan_prefixes([PackedReplies([], [[7]])], [None])


def test_cluster_shards_groups_questions_that_share_passages() -> None:
    passages = [["a", "b"], ["x", "y"], ["a", "c"], ["y", "z"], ["q"]]
    assert cluster_shards(passages, 2) == [[0, 2], [1, 3], [4]]
    assert cluster_shards(passages, 10) == [[0, 2, 1, 3, 4]]
    with pytest.raises(ValueError):
        cluster_shards(passages, 0)


@pytest.fixture(scope="module")
def scorer(components: Components) -> GainScorer:
    return GainScorer(components.generator.teacher_forced_scorer(batch_size=3))  # type: ignore[attr-defined]


def test_shared_prefix_logits_equal_each_sequence_alone(scorer: GainScorer) -> None:
    model: Any = scorer.llm._model  # type: ignore[attr-defined]
    answers = [scorer.answer_ids(a) for a in ("Wilhelm Conrad Röntgen", "Röntgen")]
    seqs = [
        PackedReplies(scorer.prompt_ids(Q1, None), answers),
        PackedReplies(scorer.prompt_ids(Q1, GOOD), answers),
        PackedReplies(scorer.prompt_ids(Q2, GOOD), answers[1:]),
        PackedReplies(scorer.prompt_ids(Q2, BAD), answers),
    ]
    groups = [None, "g", "g", "b"]
    got: dict[int, list[torch.Tensor]] = {}
    # a small budget: several batches (the node's leaves and the root's leaves apart)
    plan = SharedPrefixScorer(model, token_budget=96).score(
        seqs, groups, lambda i, x: got.__setitem__(i, x)
    )
    assert len(plan.nodes) == 1 and plan.root > 0
    assert plan.tokens(seqs) < sum(map(len, seqs))
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            assert len(got[i]) == len(s.replies)
            for logits, reply in zip(got[i], s.replies, strict=True):
                plain = model(torch.tensor([s.prompt + reply])).logits[0].float()
                want = plain[len(s.prompt) - 1 : len(s.prompt) - 1 + len(reply)]
                torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_score_questions_equals_passage_ppls(
    scorer: GainScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [
        GainItem(Q1, [GOOD, BAD, PSEUDO], ["Wilhelm Conrad Röntgen", "Röntgen"]),
        GainItem(Q2, [BAD, GOOD], ["1901"]),
    ]
    plans: list[Any] = []
    run = SharedPrefixScorer.score

    def spy(self: SharedPrefixScorer, *args: Any, **kwargs: Any) -> Any:
        plans.append(run(self, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(shared_prefix.SharedPrefixScorer, "score", spy)
    # a budget that batches the leaves of both nodes together: parents of different lengths
    # padded into one cache
    got = scorer.score_questions(items, 0.5, token_budget=4096)
    assert len(plans[0].nodes) == 2  # GOOD and BAD are each seen by both questions
    assert plans[0].nodes[0][1] != plans[0].nodes[1][1]
    for it, res in zip(items, got, strict=True):
        want = scorer.passage_ppls(it.question, it.passages, it.answers, 0.5)
        assert res.ppls == pytest.approx(want, rel=1e-4)
        # the plain likelihood: alpha 0 PPL is exp(mean NLL) of the best answer
        plain = scorer.passage_ppls(it.question, it.passages, it.answers, 0.0)
        assert [math.exp(x) for x in res.nlls] == pytest.approx(plain, rel=1e-4)
    assert got[0].ppls[0] < got[0].ppls[1]  # the helpful passage beats Deadpool
    # closed book: the best answer's mean NLL, by hand with the model
    model: Any = scorer.llm._model  # type: ignore[attr-defined]
    prompt = scorer.prompt_ids(Q2, None)
    ans = scorer.answer_ids("1901")
    with torch.inference_mode():
        labels = torch.tensor([[-100] * len(prompt) + ans])
        loss = model(torch.tensor([prompt + ans]), labels=labels).loss.item()
    assert got[1].nll_closed_book == pytest.approx(loss, rel=1e-4)


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, index_dir: Path, small_corpus: Path, llm_dir: Path
) -> None:
    monkeypatch.setenv("GAINRAG_RETRIEVAL__INDEX_DIR", str(index_dir))
    monkeypatch.setenv("GAINRAG_RETRIEVAL__CORPUS", str(small_corpus))
    monkeypatch.setenv("GAINRAG_LLM__MAX_NEW_TOKENS_PSEUDO", "24")
    monkeypatch.setenv("GAINRAG_LLM__BACKEND", "transformers")
    monkeypatch.setenv("GAINRAG_LLM__DTYPE", "float32")


def test_gain_shards_job_resumes_by_shard_and_feeds_selector_data(
    env: None,
    tmp_path: Path,
    dev_questions: list[dict],
    small_corpus: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:3]))
    out = tmp_path / "shards"
    args = ["train", "gain-shards", "--questions", str(qfile), "--limit", "3", "--k", "3"]
    args += ["--shard-size", "2", "--dir", str(out)]
    assert main([*args, "--shards", "1-1"]) == 0  # the second shard alone first
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(len(s) for s in manifest["shards"]) == [1, 2]
    assert {q for s in manifest["shards"] for q in s} == {str(q["id"]) for q in dev_questions[:3]}
    assert not (out / "shard-0000.jsonl").exists() and (out / "shard-0001.jsonl").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert "1 of 2 shards already done" in capsys.readouterr().out
    rows = [
        json.loads(line)
        for s in (0, 1)
        for line in (out / f"shard-{s:04d}.jsonl").read_text().splitlines()
    ]
    assert not list(out.glob("*.tmp"))
    assert [r["id"] for r in rows] == [q for s in manifest["shards"] for q in s]
    for row in rows:
        assert row["k"] == 3 and row["alpha"] == 0.5 and row["scorer_dtype"] == "float32"
        assert row["scorer"] == "smollm2-135m-float32" and len(row["model_sha256"]) == 64
        retrieved = [c for c in row["candidates"] if c["id"] != PSEUDO_ID]
        assert [c["rank"] for c in retrieved] == [0, 1, 2]
        assert row["answers"] == next(q["answers"] for q in dev_questions if q["id"] == row["id"])
        # the candidates scored are the manifest's, fixed when it was made
        assert [c["id"] for c in retrieved] == [x[0] for x in manifest["candidates"][row["id"]]]
        # contrastive PPL >= 1 always; the plain NLL equals it only at alpha 0
        assert all(math.isfinite(c["ppl"]) and c["nll"] > 0 for c in row["candidates"])
        assert (row["pseudo_passage"] is None) == (len(row["candidates"]) == 3)
    # another k is another set of shards, another alpha other labels: refused, not mixed in
    capsys.readouterr()
    assert main([*args[:-4], "--k", "4", "--shard-size", "2", "--dir", str(out)]) != 0
    assert "made with other settings (k: manifest 3, run 4)" in capsys.readouterr().err
    (out / "shard-0001.jsonl").unlink()
    assert main([*args, "--alpha", "0.3"]) != 0
    assert "other settings (alpha: shard 0 0.5, run 0.3)" in capsys.readouterr().err
    assert main(args) == 0  # the same settings redo the missing shard
    # expanded back to full rows: texts from the corpus, the same numbers
    full = expand_rows(out, small_corpus)
    corpus = {json.loads(x)["id"]: json.loads(x) for x in small_corpus.read_text().splitlines()}
    for short, long in zip(rows, full, strict=True):
        for c, d in zip(short["candidates"], long["candidates"], strict=True):
            assert d["ppl"] == c["ppl"]
            if d["pseudo"]:
                assert d["text"] == short["pseudo_passage"]
            else:
                src = corpus[c["id"]]
                assert (d["title"], d["text"]) == (src["title"], src["text"])
    groups = tmp_path / "groups.jsonl"
    sel = ["train", "selector-data", "--input", str(out), "--output", str(groups)]
    assert main([*sel, "--group-size", "3"]) == 0
    assert len(groups.read_text().splitlines()) == 3


def test_commit_shard_commits_only_that_file(tmp_path: Path) -> None:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("staged, not ours\n")
    git("add", "other.txt")
    shard = tmp_path / "shard-0000.jsonl"
    shard.write_text('{"id": "q"}\n')
    assert commit_shard(shard, "shard 0")
    assert git("show", "--name-only", "--format=%s", "HEAD").split() == [
        "shard",
        "0",
        "shard-0000.jsonl",
    ]
    assert "other.txt" in git("diff", "--cached", "--name-only")

    assert not commit_shard(shard, "nothing new")  # no retry loop for "nothing to commit"
    # a run killed after writing a shard and before committing it: the next run commits it
    late = tmp_path / "shard-0001.jsonl"
    late.write_text('{"id": "r"}\n')
    (tmp_path / "manifest.json").write_text("{}\n")
    assert commit_pending(tmp_path) == 2
    assert git("status", "--porcelain", "--", "shard-0001.jsonl", "manifest.json") == ""
