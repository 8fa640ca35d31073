"""``gainrag compare``: wins and losses of two eval reports, bucketed, on hand-made records; and
the report files it reads (a summary .json with gzipped records, or an older inline report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gainrag.cli import main
from gainrag.errors import ConfigurationError
from gainrag.evaluation.compare import compare, format_comparison, wrong_bucket
from gainrag.evaluation.report import load_report, records_path, write_report


def rec(qid: str, prediction: str, **kw: Any) -> dict[str, Any]:
    base = {
        "id": qid,
        "question": f"question {qid}",
        "answers": ["Paris"],
        "prediction": prediction,
        "em": float(prediction == "Paris"),
        "selected_ids": ["p1"],
        "pseudo_selected": False,
        "selected_has_answer": True,
        "recall": {1: 1.0, 5: 1.0},
    }
    return {**base, **kw}


def report(preset: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"preset": preset, "records": records}


A = report(
    "gainrag",
    [
        rec("q1", "It is Paris."),  # right by acc (not EM)
        rec("q2", "Lyon", pseudo_selected=True, selected_ids=["pseudo"]),
        rec("q3", "Paris"),
        rec("q4", "Nice", selected_has_answer=False, recall={1: 0.0, 5: 1.0}),
        rec("q5", "Nice", selected_has_answer=False, recall={1: 0.0, 5: 0.0}),
        rec("q6", "Lille", selected_ids=["p9"]),  # answer string in a non-gold passage
        rec("q7", "Paris"),
    ],
)
B = report(
    "rerank",
    [
        rec("q1", "Lyon"),  # has the answer in its passage, not extracted
        rec("q2", "Paris"),
        rec("q3", "Paris"),
        rec("q4", "Paris"),
        rec("q5", "Paris"),
        rec("q6", "Paris"),
        rec("only-b", "Paris"),
    ],
)
GOLD = {q: {"p1"} for q in ("q1", "q2", "q3", "q4", "q5", "q6", "q7")}


def test_buckets_of_wins_and_losses() -> None:
    c = compare(A, B, metric="acc", gold=GOLD)
    assert c["n"] == 6  # q7 and only-b are in one report only
    assert c["wins"]["n"] == 1 and c["wins"]["wrong_side"] == {"answer present, not extracted": 1}
    assert c["losses"]["n"] == 4
    assert c["losses"]["wrong_side"] == {
        "pseudo-passage chosen": 1,
        "distractor with the answer string": 1,
        "selector missed the answer": 1,
        "no retrieved passage has the answer": 1,
    }
    assert c["losses"]["right_side"] == {"answered from a passage with the answer": 4}
    assert c["sign_test_p"] == pytest.approx(2 * (1 + 5) / 2**5)  # 1 vs 4
    assert c["a_pseudo_selected"] == {"n": 1, "a_right": 0.0, "b_right": 1.0}
    # on EM, q1 is wrong on both sides: no win
    assert compare(A, B, metric="em", gold=GOLD)["wins"]["n"] == 0
    # without gold passages a passage with the answer counts as "present, not extracted"
    assert compare(A, B, metric="acc")["losses"]["wrong_side"]["answer present, not extracted"] == 1
    assert compare(A, B, metric="acc", examples=0)["losses"]["examples"] == {}
    text = format_comparison(c)
    assert "1 wins, 4 losses" in text and "| pseudo-passage chosen | 0 | 1 |" in text
    # same passage (p1) for q1, q3, q4, q5; the answers differ on q1, q4, q5
    assert c["same_selection"] == {"n": 4, "different_answer": 3}
    assert "same passages for 4 questions; the answers differ on 3" in text
    assert c["differences"] == {} and "Not comparable" not in text


def test_runs_with_other_versions_are_flagged() -> None:
    models = {"generator": "llamacpp:q", "generator_version": "v1", "prompt_version": "p1"}
    a = {**A, "models": models, "settings": {"k": 20, "top_n": 1}}
    b = {**B, "models": {**models, "generator_version": "v2"}, "settings": {"k": 10, "top_n": 1}}
    c = compare(a, b)
    assert c["differences"] == {"generator_version": ["v1", "v2"], "k": [20, 10]}
    text = format_comparison(c)
    assert "**Not comparable:** generator_version differs ('v1' vs 'v2')." in text
    # a field recorded by one report only (older reports) is not a difference
    assert compare({**a, "settings": {}}, b)["differences"] == {"generator_version": ["v1", "v2"]}


def test_closed_book_and_recorded_fields_take_precedence() -> None:
    assert wrong_bucket({"id": "x", "prediction": "", "answers": ["a"]}, {}) == "closed-book"
    r = rec("q", "x", selected_ids=["p9"], selected_is_gold=True)
    assert wrong_bucket(r, {"q": {"p1"}}) == "answer present, not extracted"
    r = rec("q", "x", selected_has_answer=False, retrieved_has_answer=True, recall={1: 0.0})
    assert wrong_bucket(r, {}) == "selector missed the answer"


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, q, out = (tmp_path / n for n in ("a.json", "b.json", "q.jsonl", "c.json"))
    a.write_text(json.dumps(A))
    b.write_text(json.dumps(B))
    q.write_text(
        "".join(
            json.dumps({"id": k, "question": "?", "answers": ["Paris"], "gold_ids": sorted(v)})
            + "\n"
            for k, v in GOLD.items()
        )
    )
    assert main(["compare", str(a), str(b), "--questions", str(q), "--output", str(out)]) == 0
    assert "**`gainrag` vs `rerank`** on acc, 6 shared questions" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["losses"]["wrong_side"]["distractor with the answer string"] == 1


def on_disk(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` as JSON gives it back (integer keys become strings)."""
    return json.loads(json.dumps(report))


def test_a_report_round_trips_through_the_compressed_layout(tmp_path: Path) -> None:
    # U+2028 is a line break to str.splitlines but not to JSONL: it must not split a record
    records = [rec("q1", "Paris"), rec("q2", "Lyon\u2028or Nice"), rec("q3", "Röntgen")]
    report = on_disk({"preset": "gainrag", "n": 3, "records": records, "command": "gainrag eval"})
    path = tmp_path / "eval_nq_dev_gainrag.json"
    out = write_report(path, report)
    assert out == records_path(path) == tmp_path / "eval_nq_dev_gainrag.questions.jsonl.gz"
    summary = json.loads(path.read_text())
    assert list(summary) == list(report)  # the records' reference sits where the records were
    assert summary["records"]["file"] == out.name and summary["records"]["n"] == 3
    assert "Lyon" not in path.read_text()  # the answers are in the gzipped file only
    assert json.dumps(load_report(path)) == json.dumps(report)  # key order included
    first = (path.read_bytes(), out.read_bytes())
    assert first[1][4:8] == bytes(4)  # gzip mtime 0: the bytes do not depend on the clock
    write_report(path, load_report(path))
    assert (path.read_bytes(), out.read_bytes()) == first  # re-writing leaves git clean


def test_old_inline_reports_still_load_and_compare_as_the_new_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for name, r in (("a.json", A), ("b.json", B)):
        (old / name).write_text(json.dumps(r, indent=2))
        write_report(new / name, on_disk(r))
    assert load_report(old / "a.json") == on_disk(A) == load_report(new / "a.json")
    outputs = []
    for a, b in ((old, old), (new, old), (old, new), (new, new)):
        json_out = tmp_path / f"{a.name}-{b.name}.json"
        args = [str(a / "a.json"), str(b / "b.json"), "--output", str(json_out)]
        assert main(["compare", *args]) == 0
        outputs.append((capsys.readouterr().out, json_out.read_text()))
    assert "**`gainrag` vs `rerank`** on acc, 6 shared questions" in outputs[0][0]
    assert all(o == outputs[0] for o in outputs)


def test_a_records_file_that_is_not_the_summarys_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_report(a, on_disk(A))
    write_report(b, on_disk(B))
    records_path(a).write_bytes(records_path(b).read_bytes())  # e.g. half of a merge
    with pytest.raises(ConfigurationError, match="sha256"):
        load_report(a)
    assert main(["compare", str(a), str(b)]) == 2
    assert "is not the records file of" in capsys.readouterr().err
    records_path(a).unlink()
    assert main(["compare", str(a), str(b)]) == 2
    assert "cannot read its records" in capsys.readouterr().err
