"""Answer extraction and accuracy for the reasoning stream.

Metrics follow the medical VQA literature (closed: exact match; open: exact match with
token recall and F1 reported alongside, as in MedEvalKit, whose code swaps F1 and recall:
here ``recall = |common| / |gt tokens|`` and ``f1 = 2PR / (P + R)``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

MAX_TEXT_CHARS = 20_000

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s+is\s*[:：]?\s*(.+?)(?:\.\s|\.$|\n|$)", re.I)
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
YES_NO = {"yes", "no"}


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The answer a model gave, or None when it gave none.

    Looks, in order, for the last ``<answer>...</answer>`` (innermost if nested), the last
    ``\\boxed{...}``, and "the answer is ...".

    >>> extract_answer("<think>air in the pleura</think><answer> Yes </answer>")
    'Yes'
    >>> extract_answer("so \\\\boxed{left lung}")
    'left lung'
    >>> extract_answer("The answer is CT.")
    'CT'
    >>> extract_answer("<answer></answer>") is None
    True
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[:MAX_TEXT_CHARS]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        ans = re.sub(r"</?answer>", "", tags[-1], flags=re.I).strip()
        return ans or None
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    m = list(_ANSWER_IS.finditer(text))
    if m:
        return m[-1].group(1).strip().rstrip(".") or None
    return None


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces."""
    words = str(text).lower().translate(_PUNCT).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def token_scores(pred: str, gt: str) -> tuple[float, float, float]:
    """``(precision, recall, f1)`` of normalised word tokens of ``pred`` against ``gt``.

    >>> token_scores("left lung", "lung")
    (0.5, 1.0, 0.6666666666666666)
    """
    p, g = normalize(pred).split(), normalize(gt).split()
    if not p or not g:
        return 0.0, 0.0, 0.0
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(p), common / len(g)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _closed_match(pred: str, gt: str) -> bool:
    np_, ng = normalize(pred), normalize(gt)
    if ng in YES_NO:
        # "Yes, there is an effusion" counts as yes; "yes and no" does not.
        words = set(np_.split())
        return ng in words and not (YES_NO - {ng}) & words
    return np_ == ng


def _choice_match(pred: str, gt: str, options: Sequence[dict]) -> bool:
    letters = {str(o.get("letter", "")).strip().upper(): normalize(o.get("content", "")) for o in options}
    gt_letter = gt.strip().strip("()").upper()
    if gt_letter not in letters:  # ground truth given as option text
        inv = {v: k for k, v in letters.items()}
        gt_letter = inv.get(normalize(gt), gt_letter)
    p = pred.strip()
    m = re.match(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)", p)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper() == gt_letter
    return normalize(p) == letters.get(gt_letter)


def answer_scores(
    pred: str | None, ground_truth: str, answer_type: str = "OPEN", options: Sequence[dict] | None = None
) -> dict[str, float]:
    """Accuracy of an extracted answer.

    Args:
        pred: the extracted answer (None: no answer, everything is 0).
        ground_truth: the dataset answer (option letter or text for multiple choice).
        answer_type: ``"CLOSED"`` (yes/no and other closed sets), ``"OPEN"`` or
            ``"CHOICE"`` (multiple choice; needs ``options``).
        options: ``[{"letter": "A", "content": "..."}, ...]`` for multiple choice.

    Returns:
        ``{"acc", "recall", "f1"}`` floats in ``[0, 1]``; ``acc`` is the reward's accuracy.
    """
    if pred is None or not str(pred).strip() or not str(ground_truth).strip():
        return {"acc": 0.0, "recall": 0.0, "f1": 0.0}
    pred, gt = str(pred), str(ground_truth)
    atype = (answer_type or "OPEN").strip().upper()
    if atype == "CHOICE" and options:
        acc = float(_choice_match(pred, gt, options))
    elif atype == "CLOSED" or normalize(gt) in YES_NO:
        acc = float(_closed_match(pred, gt))
    else:
        acc = float(normalize(pred) == normalize(gt))
    _, recall, f1 = token_scores(pred, gt)
    return {"acc": acc, "recall": recall, "f1": f1}
