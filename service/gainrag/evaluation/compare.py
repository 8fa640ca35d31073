"""``gainrag compare``: two eval reports question by question, wins and losses in buckets.

For every question that one report gets right and the other wrong (by acc or EM), the wrong
side's failure is put in one bucket, from what its record says about the passage it used:

* ``pseudo-passage chosen``: it answered from the LLM's own pseudo-passage;
* ``answer present, not extracted``: its passage contains a gold answer (DPR's has_answer) and
  is the question's gold passage (or no gold passage is known), yet the reader missed it;
* ``distractor with the answer string``: its passage contains the answer string but is not the
  gold passage (the string occurs in an unrelated context);
* ``selector missed the answer``: its passage lacks the answer, some retrieved passage had it;
* ``no retrieved passage has the answer``: retrieval failed, no selector could help;
* ``closed-book``: no passage at all.

The right side is described too (``answered from a passage with the answer``, ``answered from
the pseudo-passage``, ``answered without the answer string``). Examples of each bucket are
printed for the error analysis in docs/evaluation.md. Reports older than a field fall back to
what can be recomputed (acc from the prediction, the gold passage from ``--questions``).

Two reports from different runs are comparable only when the retrieval, the reader and the
prompt are the same: the versions (and k, top_n) that differ are listed, and so is how often the
two runs, given the same passage, wrote a different answer (batched decoding can change the last
bits, so a few are expected; many mean the runs are not comparable).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from gainrag.evaluation.qa_metrics import record_acc, sign_test_p
from gainrag.evaluation.questions import load_questions
from gainrag.evaluation.report import load_report

WRONG_BUCKETS = (
    "pseudo-passage chosen",
    "answer present, not extracted",
    "distractor with the answer string",
    "selector missed the answer",
    "no retrieved passage has the answer",
    "closed-book",
)


def score(record: dict[str, Any], metric: str) -> float:
    """A record's 0/1 score on ``metric`` (acc or em)."""
    return record_acc(record) if metric == "acc" else float(record[metric])


def _retrieved_has_answer(r: dict[str, Any]) -> bool | None:
    if "retrieved_has_answer" in r:
        return bool(r["retrieved_has_answer"])
    recall = r.get("recall")
    if not recall:
        return None
    return max(recall.values()) > 0  # recall at the deepest k = any retrieved passage had it


def _is_gold(r: dict[str, Any], gold: dict[str, set[str]]) -> bool | None:
    if "selected_is_gold" in r:
        return bool(r["selected_is_gold"])
    ids = gold.get(r["id"])
    if not ids:
        return None
    return any(s in ids for s in r.get("selected_ids", []))


def wrong_bucket(r: dict[str, Any], gold: dict[str, set[str]]) -> str:
    """Why the side that got a question wrong failed (one of ``WRONG_BUCKETS``)."""
    if "selected_has_answer" not in r:
        return "closed-book"
    if r.get("pseudo_selected"):
        return "pseudo-passage chosen"
    if r["selected_has_answer"]:
        return (
            "distractor with the answer string"
            if _is_gold(r, gold) is False
            else "answer present, not extracted"
        )
    if _retrieved_has_answer(r):
        return "selector missed the answer"
    return "no retrieved passage has the answer"


def right_bucket(r: dict[str, Any]) -> str:
    """What the side that got a question right answered from."""
    if r.get("pseudo_selected"):
        return "answered from the pseudo-passage"
    if r.get("selected_has_answer"):
        return "answered from a passage with the answer"
    return "answered without the answer string"


# what must be equal for two runs' answers to be comparable question by question
COMPARABLE_MODELS = (
    "retriever",
    "index_version",
    "generator",
    "generator_version",
    "prompt_version",
)
COMPARABLE_SETTINGS = (
    "k",
    "top_n",
    "llm",
    "retrieval_weight",
    "select_top",
    "selector_max_length",
    "retrieval_mode",
)


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """The versions and settings recorded by both reports that differ: name -> [a's, b's]."""
    out: dict[str, list[Any]] = {}
    for section, names in (("models", COMPARABLE_MODELS), ("settings", COMPARABLE_SETTINGS)):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for name in names:
            if name in sa and name in sb and sa[name] != sb[name]:
                out[name] = [sa[name], sb[name]]
    return out


def compare(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    metric: str = "acc",
    gold: dict[str, set[str]] | None = None,
    examples: int = 3,
) -> dict[str, Any]:
    """Wins (``a`` right, ``b`` wrong) and losses of ``a`` against ``b``, bucketed."""
    gold = gold or {}
    ra = {r["id"]: r for r in a["records"]}
    rb = {r["id"]: r for r in b["records"]}
    common = [q for q in ra if q in rb]
    out: dict[str, Any] = {"metric": metric, "a": a["preset"], "b": b["preset"], "n": len(common)}
    for side, (win, lose) in {"wins": (ra, rb), "losses": (rb, ra)}.items():
        ids = [q for q in common if score(win[q], metric) > score(lose[q], metric)]
        wrong: Counter[str] = Counter()
        right: Counter[str] = Counter()
        shown: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for q in ids:
            bucket = wrong_bucket(lose[q], gold)
            wrong[bucket] += 1
            right[right_bucket(win[q])] += 1
            if len(shown[bucket]) < examples:
                shown[bucket].append(
                    {
                        "id": q,
                        "question": win[q]["question"],
                        "answers": win[q]["answers"],
                        "right": win[q]["prediction"],
                        "right_selected": win[q].get("selected_ids", []),
                        "wrong": lose[q]["prediction"],
                        "wrong_selected": lose[q].get("selected_ids", []),
                    }
                )
        out[side] = {
            "n": len(ids),
            "wrong_side": {k: wrong[k] for k in WRONG_BUCKETS if wrong[k]},
            "right_side": dict(right),
            "examples": {k: v for k, v in shown.items() if v},
        }
    out["sign_test_p"] = sign_test_p(out["wins"]["n"], out["losses"]["n"])
    same = [q for q in common if ra[q].get("selected_ids") == rb[q].get("selected_ids")]
    out["same_selection"] = {
        "n": len(same),
        "different_answer": sum(ra[q]["prediction"] != rb[q]["prediction"] for q in same),
    }
    out["differences"] = differences(a, b)
    # the pseudo-passage's share: questions where ``a`` answered from it
    pseudo = [q for q in common if ra[q].get("pseudo_selected")]
    out["a_pseudo_selected"] = {
        "n": len(pseudo),
        "a_right": sum(score(ra[q], metric) for q in pseudo),
        "b_right": sum(score(rb[q], metric) for q in pseudo),
    }
    return out


def format_comparison(c: dict[str, Any]) -> str:
    """Markdown: the buckets of wins and losses, the pseudo-passage line, then examples."""
    lines = [
        f"**`{c['a']}` vs `{c['b']}`** on {c['metric']}, {c['n']} shared questions: "
        f"{c['wins']['n']} wins, {c['losses']['n']} losses (sign test p = {c['sign_test_p']:.3f})",
        "",
        f"| the other side was wrong because | wins of `{c['a']}` | losses of `{c['a']}` |",
        "|---|---|---|",
    ]
    for k in WRONG_BUCKETS:
        w, lo = c["wins"]["wrong_side"].get(k, 0), c["losses"]["wrong_side"].get(k, 0)
        if w or lo:
            lines.append(f"| {k} | {w} | {lo} |")
    rights = sorted(set(c["wins"]["right_side"]) | set(c["losses"]["right_side"]))
    lines += ["", "| the right side | wins | losses |", "|---|---|---|"]
    for k in rights:
        lines.append(
            f"| {k} | {c['wins']['right_side'].get(k, 0)} | {c['losses']['right_side'].get(k, 0)} |"
        )
    p = c["a_pseudo_selected"]
    same = c["same_selection"]
    lines += [
        "",
        f"`{c['a']}` chose the pseudo-passage for {p['n']} questions: right on "
        f"{p['a_right']:.0f}, `{c['b']}` right on {p['b_right']:.0f} of them.",
        f"Both gave the reader the same passages for {same['n']} questions; the answers differ "
        f"on {same['different_answer']} of them.",
    ]
    for name, (va, vb) in c["differences"].items():
        lines.append(f"**Not comparable:** {name} differs ({va!r} vs {vb!r}).")
    for side in ("wins", "losses"):
        for bucket, exs in c[side]["examples"].items():
            lines += ["", f"{side} / {bucket}:"]
            for e in exs:
                lines.append(
                    f"- {e['id']} {e['question']!r} gold {e['answers']}: right {e['right']!r} "
                    f"({', '.join(e['right_selected'])}), wrong {e['wrong']!r} "
                    f"({', '.join(e['wrong_selected'])})"
                )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gainrag compare``."""
    parser.add_argument("a", type=Path, help="eval report .json (the preset judged)")
    parser.add_argument("b", type=Path, help="eval report .json (the baseline)")
    parser.add_argument("--metric", choices=["acc", "em"], default="acc")
    parser.add_argument(
        "--questions", type=Path, help="question file with gold_ids (for older reports)"
    )
    parser.add_argument("--examples", type=int, default=3, help="examples per bucket")
    parser.add_argument("--output", type=Path, help="write the comparison as JSON here")


def main(args: argparse.Namespace) -> None:
    """``gainrag compare``."""
    # either layout: a summary with its .questions.jsonl.gz, or an older report with inline records
    a, b = (load_report(p) for p in (args.a, args.b))
    gold: dict[str, set[str]] = {}
    if args.questions:
        gold = {
            str(q["id"]): set(q.get("gold_ids") or [])
            for q in load_questions(args.questions)
            if "id" in q
        }
    c = compare(a, b, metric=args.metric, gold=gold, examples=args.examples)
    print(format_comparison(c))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(c, indent=2, ensure_ascii=False))
