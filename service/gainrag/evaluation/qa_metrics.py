"""Open-domain QA metrics.

* EM and F1 use SQuAD v1.1's answer normalisation (lowercase, drop punctuation and the articles
  a/an/the, collapse whitespace), maximised over the gold answers.
* ``cover_em`` ("acc" in reports) is GainRAG's answer metric: a hit when some normalised gold
  answer is a substring of the normalised prediction (see its docstring for the edge cases).
* ``has_answer`` is DPR's retrieval check: the passage contains a gold answer as a token
  sequence, with DPR's SimpleTokenizer (uncased, NFD-normalised).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def cover_em(prediction: str, golds: Iterable[str]) -> float:
    """GainRAG's "acc" (cover-EM): 1.0 if a normalised gold is contained in the normalised
    prediction (0.0 with no golds).

    The reference (``em_max_over_ground_truths(..., regex=True)`` in GainRAG's
    ``evaluation.py``) compiles the normalised gold as a regex and searches the normalised
    prediction. Normalisation strips every ASCII punctuation character, so no regex
    metacharacter survives and the search is a plain substring test, which this is. Consequences
    kept on purpose, for comparable numbers:

    * no word boundaries: gold "cat" covers "concatenate"; gold "1" covers "1901";
    * punctuation inside numbers disappears on both sides: "1,000" covers "1000";
    * a gold that normalises to "" (e.g. "The" or "...") covers every prediction, as the empty
      pattern does in the reference.
    """
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) in pred for g in golds))


def record_acc(record: Mapping[str, Any]) -> float:
    """An eval record's acc; computed from its prediction for reports older than the metric."""
    if "acc" in record:
        return float(record["acc"])
    return cover_em(record["prediction"], record["answers"])


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    """Token-level F1, maximised over gold answers (0.0 with no golds)."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


# DPR's SimpleTokenizer: runs of letters/numbers/marks, or any other non-space character.
_DPR_TOKEN = regex.compile(
    r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
    flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE,
)


def dpr_tokens(text: str) -> list[str]:
    """Uncased DPR tokens of NFD-normalised text."""
    text = unicodedata.normalize("NFD", text)
    return [m.group().lower() for m in _DPR_TOKEN.finditer(text)]


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """True if any answer's token sequence occurs in the text's token sequence."""
    tokens = dpr_tokens(text)
    for answer in answers:
        a = dpr_tokens(answer)
        if not a:
            continue
        n = len(a)
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n] == a:
                return True
    return False


def recall_at(hits: Sequence[bool], ks: Iterable[int]) -> dict[int, float]:
    """For ranked hit flags: 1.0 at k if any of the first k is a hit."""
    return {k: float(any(hits[:k])) for k in ks}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on discordant pairs; ties are dropped.

    Why: two presets answer the same questions, so their EM difference is judged on the questions
    where exactly one of them is right, not by comparing two rates as if independent.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_em(a: dict[str, float], b: dict[str, float]) -> tuple[int, int, float]:
    """Questions where ``a`` scores and ``b`` does not, the reverse, and the sign-test p.

    ``a`` and ``b`` map question ids to a 0/1 metric (EM or acc); only ids in both count.
    """
    common = a.keys() & b.keys()
    wins = sum(1 for q in common if a[q] > b[q])
    losses = sum(1 for q in common if a[q] < b[q])
    return wins, losses, sign_test_p(wins, losses)
