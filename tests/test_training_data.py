"""Gain-signal synthesis end to end on a small slice, and selector-data construction."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from gainrag.cli import main
from gainrag.training.shard_loop import finished_ids
from gainrag.training.signals.selector_data import gain_label, make_group


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, index_dir: Path, small_corpus: Path, llm_dir: Path
) -> None:
    monkeypatch.setenv("GAINRAG_RETRIEVAL__INDEX_DIR", str(index_dir))
    monkeypatch.setenv("GAINRAG_LLM__MAX_NEW_TOKENS_PSEUDO", "24")
    # The in-process reader (auto would pick the managed llama.cpp engine where it is built).
    monkeypatch.setenv("GAINRAG_LLM__BACKEND", "transformers")


def test_gain_signals_then_selector_data(
    env: None, tmp_path: Path, dev_questions: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:3]))
    out = tmp_path / "signals.jsonl"
    args = [
        "train",
        "gain-signals",
        "--questions",
        str(qfile),
        "--limit",
        "2",
        "--k",
        "3",
        "--output",
        str(out),
    ]
    # two shards (as two processes would run them) fill one file with disjoint questions
    assert main([*args, "--shard", "1/2"]) == 0
    assert main([*args, "--shard", "0/2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2
    assert {r["id"] for r in rows} <= {str(q["id"]) for q in dev_questions[:3]}
    for row in rows:
        assert row["alpha"] == 0.5 and row["k"] == 3
        # the in-process reader wrote the pseudo-passage; the scorer is its de-quantised GGUF
        assert row["generator"].startswith("smollm2-135m-")
        assert row["scorer"] == f"smollm2-135m-{row['scorer_dtype']}"
        assert row["scorer_weights"]["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert row["scorer_weights"]["dequantised_from_gguf"] is True
        retrieved = [c for c in row["candidates"] if not c["pseudo"]]
        assert [c["retrieval_rank"] for c in retrieved] == [0, 1, 2]
        assert all(math.isfinite(c["ppl"]) and c["ppl"] >= 1.0 for c in row["candidates"])
        assert all(isinstance(c["has_answer"], bool) for c in row["candidates"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--shard", "2/2"])
    assert "need 0 <= I < N" in capsys.readouterr().err

    # Resumable: a rerun skips finished questions; a torn last line is dropped and redone.
    assert main(args) == 0
    assert "0 written, 2 already done" in capsys.readouterr().out
    with out.open("a") as f:
        f.write('{"id": "torn", "quest')
    assert finished_ids(out) == {r["id"] for r in rows}
    assert out.read_text().count("\n") == 2

    groups = tmp_path / "groups.jsonl"
    assert (
        main(
            [
                "train",
                "selector-data",
                "--input",
                str(out),
                "--output",
                str(groups),
                "--group-size",
                "4",
            ]
        )
        == 0
    )
    made = [json.loads(line) for line in groups.read_text().splitlines()]
    assert len(made) == 2
    for g, row in zip(made, rows, strict=True):
        assert g["query"] == row["question"]
        assert len(g["pos"]) == 1 and len(g["neg"]) == 3 == len(g["neg_scores"])
        best = min(c["ppl"] for c in row["candidates"])
        assert g["pos_scores"] == [pytest.approx(-math.log(best + 1))]
        assert all(s <= g["pos_scores"][0] for s in g["neg_scores"])


def test_gain_signals_with_the_reader_behind_a_llama_server(
    env: None,
    tmp_path: Path,
    dev_questions: list[dict],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The default reader's path: pseudo-passages from an OpenAI-compatible llama.cpp server
    # chosen by settings, PPLs from the same model's weights in torch, generations memoised.
    from gainrag_harness import llama_service

    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:2]))
    out, memo = tmp_path / "signals.jsonl", tmp_path / "memo.jsonl"
    args = ["train", "gain-signals", "--questions", str(qfile), "--k", "2", "--output", str(out)]
    with llama_service(tmp_path / "llm") as llm:
        monkeypatch.setenv("GAINRAG_LLM__BACKEND", "openai")
        monkeypatch.setenv("GAINRAG_LLM__BASE_URL", llm.url + "/v1")
        monkeypatch.setenv("GAINRAG_LLM__MODEL", "smollm2-135m")  # served name = bundled name
        monkeypatch.setenv("GAINRAG_LLM__MODEL_VERSION", "smollm2-135m-q4_1-llamacpp")
        assert main([*args, "--limit", "1", "--generation-memo", str(memo)]) == 0
        assert "1 written in" in capsys.readouterr().out
        # resumed with a larger limit: the first question is skipped, the second one is added
        assert main([*args, "--limit", "2", "--generation-memo", str(memo)]) == 0
        assert "1 written in" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2
    memo_rows = [json.loads(line) for line in memo.read_text().splitlines()]
    assert len(memo_rows) == 2  # one pseudo-passage per question, none generated twice
    for row in rows:
        assert row["generator"] == "smollm2-135m-q4_1-llamacpp"
        assert row["scorer"] == f"smollm2-135m-{row['scorer_dtype']}"
        assert row["scorer_weights"]["dequantised_from_gguf"] is True
        pseudo = [c for c in row["candidates"] if c["pseudo"]]
        assert len(row["candidates"]) == 2 + len(pseudo) and len(pseudo) <= 1
        assert {m["output"].strip() for m in memo_rows} >= {c["text"] for c in pseudo}
        assert all(math.isfinite(c["ppl"]) and c["ppl"] >= 1.0 for c in row["candidates"])


def test_selector_data_filter_keeps_questions_the_reader_answers(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two tiny questions answered by the real in-process reader (SmolLM2). Whatever it says, a
    # gold that normalises to "" ("The") is covered, as in the reference's regex; a nonsense
    # gold never is: so the filter must keep the first and drop the second.
    def cand(i: int, ppl: float) -> dict:
        return {"id": f"p{i}", "title": f"T{i}", "text": f"Passage {i} text.", "ppl": ppl}

    rows = [
        {"id": "keep", "question": "what is it", "answers": ["The"],
         "candidates": [cand(0, 4.0), cand(1, 2.0), cand(2, 8.0)]},
        {"id": "drop", "question": "what is it", "answers": ["zqxv wvvk"],
         "candidates": [cand(0, 3.0), cand(1, 5.0), cand(2, 1.5)]},
    ]  # fmt: skip
    src, out, memo = tmp_path / "s.jsonl", tmp_path / "g.jsonl", tmp_path / "memo.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "train",
        "selector-data",
        "--input",
        str(src),
        "--output",
        str(out),
        "--group-size",
        "3",
    ]
    assert main([*args, "--filter-with-reader", "--generation-memo", str(memo)]) == 0
    assert "1 groups of 3 (1 of 2 questions kept by the reader filter)" in capsys.readouterr().out
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(groups) == 1 and groups[0]["pos"] == ["T1\nPassage 1 text."]
    log = [
        json.loads(line) for line in (tmp_path / "g.jsonl.filter.jsonl").read_text().splitlines()
    ]
    assert [(v["id"], v["best_id"], v["acc"]) for v in log] == [
        ("keep", "p1", 1.0),
        ("drop", "p2", 0.0),
    ]
    assert all(isinstance(v["answer"], str) for v in log)
    # a second run answers from the memo: no new generation is recorded
    assert main([*args, "--filter-with-reader", "--generation-memo", str(memo)]) == 0
    assert len(memo.read_text().splitlines()) == 2
    # without the filter every question makes a group
    assert main(args) == 0
    assert "2 groups of 3 ->" in capsys.readouterr().out


def test_merge_signals_joins_shards_once_and_checks_they_are_all_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = tmp_path / "s.0.jsonl", tmp_path / "s.1.jsonl", tmp_path / "all.jsonl"
    a.write_text('{"id": "q1", "v": 1}\n{"id": "q3", "v": 3}\n{"id": "q5", "v"')  # torn tail
    b.write_text('{"id": "q2", "v": 2}\n{"id": "q3", "v": 99}\n')  # q3 twice (a retried pod)
    args = ["train", "merge-signals", "--inputs", str(a), str(b), "--output", str(out)]
    assert main([*args, "--expect", "2"]) == 0
    assert (
        "3 questions from 2 shards (1 torn lines, 1 duplicates dropped)" in capsys.readouterr().out
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["v"]) for r in rows] == [("q1", 1), ("q3", 3), ("q2", 2)]
    assert main([*args, "--expect", "3"]) == 2
    assert "expected 3 shard files, got 2" in capsys.readouterr().err
    assert main([*args[:-3], str(tmp_path / "s.2.jsonl"), "--output", str(out)]) == 2
    assert "missing shard files" in capsys.readouterr().err


def row_with(ppls: list[float]) -> dict:
    return {
        "question": "q",
        "candidates": [{"title": f"t{i}", "text": f"x{i}", "ppl": p} for i, p in enumerate(ppls)],
    }


def test_labels_and_groups() -> None:
    assert gain_label(0.0) == 0.0
    assert gain_label(math.e - 1) == pytest.approx(-1.0)
    g = make_group(row_with([5.0, 2.0, 9.0, 3.0, 7.0]), 3, random.Random(0))
    assert g is not None
    assert g["pos"] == ["t1\nx1"] and g["pos_scores"] == [pytest.approx(-math.log(3.0))]
    assert len(g["neg"]) == 2 and len(set(g["neg"])) == 2  # without replacement
    assert "t1\nx1" not in g["neg"]
    for text, score in zip(g["neg"], g["neg_scores"], strict=True):
        ppl = {"t0\nx0": 5.0, "t2\nx2": 9.0, "t3\nx3": 3.0, "t4\nx4": 7.0}[text]
        assert score == pytest.approx(-math.log(ppl + 1))


def test_small_candidate_sets_sample_with_replacement_or_skip() -> None:
    g = make_group(row_with([4.0, 1.0]), 5, random.Random(0))
    assert g is not None and g["neg"] == ["t0\nx0"] * 4
    assert make_group(row_with([4.0]), 5, random.Random(0)) is None
    assert make_group(row_with([math.inf, 2.0]), 5, random.Random(0)) is None


def test_relevance_groups_use_gold_positives_and_safe_negatives(
    index_dir: Path, encoder: object, dev_questions: list[dict]
) -> None:
    from gainrag.evaluation.qa_metrics import has_answer
    from gainrag.retrieval.index import PassageIndex
    from gainrag.retrieval.local import LocalRetriever
    from gainrag.training.relevance_data import relevance_groups

    retriever = LocalRetriever(encoder, PassageIndex.load(index_dir))  # type: ignore[arg-type]
    qs = [*dev_questions, {"question": "no gold here", "answers": ["x"], "gold_ids": ["nope"]}]
    groups = relevance_groups(retriever, qs, group_size=4, k=20)
    assert len(groups) == len(dev_questions)  # the question without an indexed gold is skipped
    by_id = {p.id: p for p in retriever.index.passages}
    for q, g in zip(dev_questions, groups, strict=True):
        gold = by_id[q["gold_ids"][0]]
        assert g["query"] == q["question"] and g["pos"] == [gold.as_candidate_text()]
        assert len(g["neg"]) == 3 and gold.as_candidate_text() not in g["neg"]
        assert not any(has_answer(n.split("\n", 1)[1], q["answers"]) for n in g["neg"])


def test_training_questions_interleave_files_and_are_seeded(tmp_path: Path) -> None:
    from gainrag.training.questions import training_questions

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "question": "q", "answers": ["x"]}) + "\n" for i in range(5)
        )
    )
    b.write_text(
        "".join(
            json.dumps({"id": f"b{i}", "question": "q", "answers": ["x"]}) + "\n" for i in range(2)
        )
        + json.dumps({"id": "b-empty", "question": "q", "answers": [" "]})
        + "\n"
    )
    got = [q["id"] for q in training_questions([a, b], 3, seed=1)]
    assert [i[0] for i in got] == ["a", "b", "a", "b", "a"]  # b has only 2 answerable questions
    assert got == [q["id"] for q in training_questions([a, b], 3, seed=1)]  # reproducible


def test_relevance_then_distillation_through_the_cli(
    env: None, tmp_path: Path, dev_questions: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    # The two training jobs chained as documented, on a tiny slice: warm start, then KL from it.
    qfile = tmp_path / "train.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in dev_questions[:2]))
    tiny = ["--max-length", "64", "--epochs", "1"]
    warm = tmp_path / "relevance"
    rel = ["train", "relevance", "--questions", str(qfile), "--group-size", "3", "--k", "10"]
    assert main([*rel, *tiny, "--out", str(warm)]) == 0
    assert "relevance: 2 groups from 2 questions" in capsys.readouterr().out
    assert json.loads((warm / "gainrag_training.json").read_text())["config"]["loss"] == "infonce"

    groups = tmp_path / "groups.jsonl"
    groups.write_text(
        json.dumps(
            {
                "query": "who discovered x-rays",
                "pos": ["Röntgen\nWilhelm Röntgen discovered X-rays."],
                "neg": ["Cats\nA cat.", "Dogs\nA dog."],
                "pos_scores": [-0.5],
                "neg_scores": [-2.0, -2.5],
            }
        )
        + "\n"
    )
    gain = tmp_path / "gainrag"
    dis = ["train", "selector", "--groups", str(groups), "--init", str(warm), "--out", str(gain)]
    assert main([*dis, *tiny]) == 0
    meta = json.loads((gain / "gainrag_training.json").read_text())
    assert meta["config"]["loss"] == "kl" and meta["init"] == str(warm) and meta["groups"] == 1

    # without --init the warm start comes from the settings; a missing one is a clear error
    assert (
        main(
            [
                "train",
                "selector",
                "--groups",
                str(groups),
                "--init",
                str(tmp_path / "x"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "no warm-start checkpoint" in capsys.readouterr().err
