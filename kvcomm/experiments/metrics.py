"""Answer metrics of the KVComm paper: token F1 (match = F1 > 0.5), exact match, ROUGE-L recall.

Normalisation follows SQuAD: lower-case, drop punctuation and the articles a/an/the, collapse
whitespace. Each metric takes the best score over the reference answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _f1(pred: str, ref: str) -> float:
    p, r = normalise(pred).split(), normalise(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, answers: list[str]) -> float:
    return max((_f1(pred, a) for a in answers), default=0.0)


def match(pred: str, answers: list[str], threshold: float = 0.5) -> bool:
    """The paper's 'F1' column: the share of answers whose token F1 exceeds 0.5."""
    return token_f1(pred, answers) > threshold


def exact_match(pred: str, answers: list[str]) -> bool:
    return any(normalise(pred) == normalise(a) for a in answers)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(pred: str, answers: list[str]) -> float:
    """LCS(pred, ref) / |ref| in normalised tokens (the paper's TMATH metric)."""
    best = 0.0
    for a in answers:
        ref = normalise(a).split()
        if ref:
            best = max(best, _lcs(normalise(pred).split(), ref) / len(ref))
    return best


def contains(reply: str, answers: list[str]) -> bool:
    """Whether a normalised reference answer occurs in the normalised reply, on word boundaries:
    recall, whatever the reply's length ("Paris, France." contains "France")."""
    text = f" {normalise(reply)} "
    return any(f" {normalise(a)} " in text for a in answers if normalise(a))


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict:
    """Exact (binomial) two-sided McNemar test of paired outcomes: `a_only` items right for a alone,
    `b_only` for b alone, and p, the chance of a split this uneven if both were equally good."""
    from math import comb

    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
    return {"a_only": a_only, "b_only": b_only, "p": p}
