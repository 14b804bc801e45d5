"""Scoring a prediction under two protocols, both always reported (docs/design.md section 8).

* ``medevalkit``: MedEvalKit's rule-based judgement copied rule for rule, quirks included, so
  numbers can be set beside published tables. Source read:
  https://github.com/alibaba-damo-academy/MedEvalKit at commit
  ``9b12e3b34232a8779cc1275417bf4f72f03d28e0`` (2026-02-24, "update mmmu eval"):

  - ``utils/utils.py``: ``parse_response``, ``judge_close_end_vqa``, ``judge_judgement``,
    ``judge_open_end_vqa`` (its ``em``), ``calculate_f1``, ``judge_multi_choice``,
    ``find_most_similar_index``, ``get_content_between_a_b``, ``extract``;
  - ``utils/SLAKE/SLAKE.py``, ``utils/VQA_RAD/VQA_RAD.py``, ``utils/PATH_VQA/PATH_VQA.py``,
    ``utils/PMC_VQA/PMC_VQA.py``, ``utils/OmniMedVQA/OmniMedVQA.py``,
    ``utils/MedXpertQA/MedXpertQA.py``: ``cal_metrics`` (what is extracted before judging, and
    which judge a sample gets);
  - ``utils/MMMU/eval_val.py`` and ``utils/MMMU/eval_utils.py``: ``parse_multi_choice_response``,
    ``eval_multi_choice``;
  - ``extract_boxed_content`` is ``mathruler.grader.extract_boxed_content``
    (https://github.com/hiyouga/MathRuler, ``mathruler/grader.py`` at commit
    ``c904bf8acdf6a80da7065d240529289d317e24c4``): the last ``\\boxed{``, braces balanced, stripped;
    the *string* ``"None"`` when there is none.

  The LLM judge (``use_llm_judge=True``), BLEU and ROUGE are not reproduced: only the rule
  verdict (``correct`` / ``em``). Quirks kept on purpose, among others:

  - ``parse_response`` lower-cases, takes ``\\boxed{}`` (if the word "boxed" occurs) else the
    ``<answer>`` content, then for each marker in order ("**answer**:", ..., "answer is",
    "answer:", "答案:", "final answer", "final answer is") the text after its last occurrence;
    nothing is stripped, so "The answer is: Lung." leaves ``": lung."``, which matches no answer.
  - SLAKE closed questions use the yes/no rule only when the raw ground truth is exactly "yes" or
    "no"; SLAKE's are "Yes"/"No", so in practice: exact match after lower-casing and removing every
    "." and newline ("Yes." is right, "Yes, it is." is wrong).
  - yes/no rule (``judge_judgement``): right when exactly one of the *substrings* "yes"/"no"
    occurs and the answer occurs: "No, not seen" is right for "no", "Yes, a nodule" is wrong
    for "yes" ("no" in "nodule"), "not enlarged" is right for "no".
  - VQA-RAD and PathVQA judge by the answer, not the answer type: yes/no answers by the yes/no
    rule, every other answer (closed ones too) by exact match after lower-case and strip.
  - open answers: exact match of the parsed response (no "." removed: "Lung." is wrong for "lung";
    no article removal: "the lung" is wrong).
  - ``calculate_f1`` uses token *sets*, no punctuation removal, returns ``(f1, precision, recall)``
    which ``judge_open_end_vqa`` unpacks as ``precision, recall, f1`` (the reported "precision" is
    F1, "recall" is precision, "f1" is recall), and returns a bare ``0`` (a crash when unpacked)
    when either side is empty: see :func:`medevalkit_token_f1` (right names) and
    :func:`medevalkit_reported_token_scores` (MedEvalKit's names).
  - multiple choice (``judge_multi_choice``): unparsed responses count as the option most similar
    (``difflib``) to the whole response; MMMU picks a *random* letter when nothing parses (pass
    ``rng`` to make it reproducible).

* ``strict``: this project's normalised matching, the reward's own rules
  (:mod:`vitos_verl.rewards.answers`): :func:`~vitos_verl.rewards.answers.extract_answer` (last
  ``<answer>``, ``\\boxed{}`` inside it or alone, "the answer is ...", LaTeX unwrapped, final
  full stop dropped), falling back to the whole output read with
  :func:`~vitos_verl.rewards.answers.clean_answer` when it holds none (untagged plain answers such
  as "yes"), then :func:`~vitos_verl.rewards.answers.answer_scores` (case, punctuation and
  articles ignored; yes/no as whole words, one of them only; option letter or option text for
  multiple choice; token precision/recall/F1 named correctly).
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

from vitos_verl.rewards.answers import answer_scores, clean_answer, extract_answer, token_scores

PROTOCOLS = ("medevalkit", "strict")


def protocols_for(dataset: str) -> tuple[str, ...]:
    """The protocols that judge ``dataset``: both for MedEvalKit's seven (:data:`DATASETS`),
    ``("strict",)`` for any other dataset in the row schema (e.g. ``data_prep.sparse_evidence``'s
    controlled task), for which MedEvalKit has no rule."""
    return PROTOCOLS if dataset in DATASETS else ("strict",)
DATASETS = ("slake", "vqa_rad", "pathvqa", "pmc_vqa", "omnimedvqa", "mmmu_med", "medxpertqa_mm")
ANSWER_TYPES = ("OPEN", "CLOSED", "CHOICE")
CHOICE_DATASETS = ("pmc_vqa", "omnimedvqa", "mmmu_med", "medxpertqa_mm")

MEDEVALKIT_REPO = "https://github.com/alibaba-damo-academy/MedEvalKit"
MEDEVALKIT_COMMIT = "9b12e3b34232a8779cc1275417bf4f72f03d28e0"
MATHRULER_REPO = "https://github.com/hiyouga/MathRuler"
MATHRULER_COMMIT = "c904bf8acdf6a80da7065d240529289d317e24c4"

_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]\s*")


class TokenF1(NamedTuple):
    """Token overlap of a prediction with the ground truth, each value under its own name."""

    precision: float  # |common| / |prediction tokens|
    recall: float  # |common| / |ground-truth tokens|
    f1: float  # 2PR / (P + R)


# --------------------------------------------------------------------------- MedEvalKit (copied)
# Each function below mirrors the MedEvalKit / MathRuler function named in its docstring, line
# for line; only names, types and comments differ.


def _mek_extract_boxed_content(text: str) -> str:
    """``mathruler.grader.extract_boxed_content``: last ``\\boxed{`` content, or ``"None"``."""
    depth = 0
    start_pos = text.rfind(r"\boxed{")
    end_pos = -1
    content = ""
    if start_pos != -1:
        content = text[start_pos + len(r"\boxed{") :]
        for i, char in enumerate(content):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            if depth == -1:
                end_pos = i
                break
    if end_pos != -1:
        return content[:end_pos].strip()
    return "None"


def _mek_get_content_between_a_b(start_tag: str, end_tag: str, text: str) -> str:
    """``utils/utils.py: get_content_between_a_b``: every tagged span, joined by spaces."""
    extracted_text = ""
    start_index = text.find(start_tag)
    while start_index != -1:
        end_index = text.find(end_tag, start_index + len(start_tag))
        if end_index != -1:
            extracted_text += text[start_index + len(start_tag) : end_index] + " "
            start_index = text.find(start_tag, end_index + len(end_tag))
        else:
            break
    return extracted_text.strip()


def _mek_extract(text: str, tag: str, hard: bool = True) -> str:
    """``utils/utils.py: extract``: the tagged content, else the whole text (``hard``)."""
    if text:
        target_str = _mek_get_content_between_a_b(f"<{tag}>", f"</{tag}>", text)
        if target_str:
            return target_str
        if hard:
            return text
        return ""
    return ""


_MEK_ANSWER_PATTERNS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)


def _mek_parse_response(response: str) -> str:
    """``utils/utils.py: parse_response``."""
    response = response.lower()
    if "boxed" in response:
        response = _mek_extract_boxed_content(response)
    elif "<answer>" in response:
        response = _mek_extract(response, "answer")
    for answer_pattern in _MEK_ANSWER_PATTERNS:
        if answer_pattern in response:
            response = response.split(answer_pattern)[-1]
    return response


def _mek_judge_close_end_vqa(answer: str, response: str) -> bool:
    """``utils/utils.py: judge_close_end_vqa``."""
    answer = answer.lower()
    response = _mek_parse_response(response)
    response = response.replace("\n", "").replace(".", "")
    return response == answer


def _mek_judge_judgement(answer: str, response: str) -> bool:
    """``utils/utils.py: judge_judgement`` (substring yes/no rule)."""
    answer = answer.lower()
    response = _mek_parse_response(response)
    response = response.replace("\n", "").replace(".", "")
    if ("yes" in response) ^ ("no" in response):
        if answer in response:
            return True
    return False


def _mek_judge_open_end_vqa_em(answer: str, response: str) -> bool:
    """``utils/utils.py: judge_open_end_vqa``, its ``em`` (BLEU/ROUGE/F1 left out)."""
    answer = answer.lower()
    response = _mek_parse_response(response)
    return response == answer


def _mek_calculate_f1(prediction: str, ground_truth: str) -> tuple[float, float, float] | int:
    """``utils/utils.py: calculate_f1``: ``(f1, precision, recall)``, or ``0`` when a side is empty."""
    prediction_tokens = set(prediction.lower().split())
    ground_truth_tokens = set(ground_truth.lower().split())
    common = prediction_tokens & ground_truth_tokens
    if len(prediction_tokens) == 0 or len(ground_truth_tokens) == 0:
        return 0
    precision = len(common) / len(prediction_tokens)
    recall = len(common) / len(ground_truth_tokens)
    if precision + recall == 0:
        return 0, 0, 0
    f1 = 2 * (precision * recall) / (precision + recall)
    return f1, precision, recall


def _mek_find_most_similar_index(str_list: Sequence[str], target_str: str) -> int:
    """``utils/utils.py: find_most_similar_index`` (first best ``difflib`` ratio, 0 if none > 0)."""
    most_similar_index = 0
    highest_similarity = 0.0
    for i, s in enumerate(str_list):
        similarity = difflib.SequenceMatcher(None, s, target_str).ratio()
        if similarity > highest_similarity:
            most_similar_index = i
            highest_similarity = similarity
    return most_similar_index


def _mek_judge_multi_choice(choices: Sequence[str], answer: str, response: str) -> bool:
    """``utils/utils.py: judge_multi_choice``."""
    response = response.lower()
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    if response.split("\n\n")[0] in letters:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in letters:
        response = response.split("\n\n")[-1].split(".")[0]
    response = _mek_parse_response(response)
    alphas = letters
    choices = [choice.lower() for choice in choices]
    flag = False
    response = response.strip().lower()
    response = response.replace("\n", "")
    split_response = response.split(".")[0]
    split_response = split_response.split(":")[-1]
    answer = answer.strip().lower()
    if split_response == answer:  # letter-letter or text-text
        flag = True
    elif split_response in alphas:  # letter given, text expected
        if choices[ord(split_response) - ord("a")] == answer:
            flag = True
    elif split_response in choices:  # text given, letter expected
        if answer in alphas and split_response == choices[ord(answer) - ord("a")]:
            flag = True
    else:  # unparsed: the most similar option
        index = _mek_find_most_similar_index(choices, response)
        if alphas[index] == answer or choices[index] == answer:
            flag = True
    return flag


def _mek_mmmu_parse_multi_choice_response(
    response: str, all_choices: Sequence[str], index2ans: dict[str, str], rng: random.Random | None = None
) -> str:
    """``utils/MMMU/eval_utils.py: parse_multi_choice_response`` (random letter when unparsed)."""
    response = "" if response is None else response
    if "<answer>" in response:
        response = _mek_extract(response, "answer")
    elif "\\boxed" in response:
        response = _mek_extract_boxed_content(response)
    response = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans = True
    ans_with_brack = False
    candidates: list[str] = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if len(candidates) == 0:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if len(candidates) == 0:
        return (rng or random).choice(list(all_choices))
    if len(candidates) > 1:
        start_indexes = []
        if index_ans:
            if ans_with_brack:
                start_indexes = [response.rfind(f"({can})") for can in candidates]
            else:
                start_indexes = [response.rfind(f" {can} ") for can in candidates]
        else:
            start_indexes = [response.lower().rfind(index2ans[can].lower()) for can in candidates]
        return candidates[max(range(len(start_indexes)), key=start_indexes.__getitem__)]  # np.argmax
    return candidates[0]


def _mek_pre_extract(response: str) -> str:
    """What SLAKE / VQA_RAD / PATH_VQA ``cal_metrics`` do first: boxed content, else ``<answer>``."""
    boxed = _mek_extract_boxed_content(response)
    if boxed != "None":
        return boxed
    if "<answer>" in response:
        return _mek_extract(response, "answer")
    return response


def _judge_medevalkit(
    dataset: str,
    prediction: str,
    answer: str,
    answer_type: str,
    choices: Sequence[str] | None,
    rng: random.Random | None,
) -> bool:
    if dataset == "slake":  # utils/SLAKE/SLAKE.py: cal_metrics
        response = _mek_pre_extract(prediction)
        if answer_type == "OPEN":
            return _mek_judge_open_end_vqa_em(answer, response)
        if answer in ["yes", "no"]:
            return _mek_judge_judgement(answer, response)
        return _mek_judge_close_end_vqa(answer, response)
    if dataset in ("vqa_rad", "pathvqa"):  # utils/VQA_RAD/VQA_RAD.py, utils/PATH_VQA/PATH_VQA.py
        response = _mek_pre_extract(prediction)
        answer = answer.lower().strip()
        response = response.lower().strip()
        if answer in ["yes", "no"]:
            return _mek_judge_judgement(answer, response)
        return _mek_judge_open_end_vqa_em(answer, response)
    if choices is None:
        raise ValueError(f"medevalkit judges {dataset!r} against its option list: pass choices=")
    if dataset == "pmc_vqa":  # utils/PMC_VQA/PMC_VQA.py: the raw response
        return _mek_judge_multi_choice(choices, answer, prediction)
    if dataset in ("omnimedvqa", "medxpertqa_mm"):  # the <answer> content, else the whole response
        return _mek_judge_multi_choice(choices, answer, _mek_extract(prediction, "answer"))
    # mmmu_med: utils/MMMU/eval_val.py (run_model) then eval_utils.eval_multi_choice
    if answer_type != "CHOICE":
        raise ValueError("medevalkit's MMMU open-question rule is not reproduced here; mmmu_med needs CHOICE")
    response = prediction
    if "<answer>" in response:
        response = _mek_extract(response, "answer")
    if _mek_extract_boxed_content(response) != "None":
        response = _mek_extract_boxed_content(response)
    all_choices = [chr(ord("A") + i) for i in range(len(choices))]
    index2ans = {letter: _option_text(c) for letter, c in zip(all_choices, choices)}
    return _mek_mmmu_parse_multi_choice_response(response, all_choices, index2ans, rng) == answer


# --------------------------------------------------------------------------- strict


def _option_text(choice: str) -> str:
    """``"B. Liver"`` / ``"(B) Liver"`` / ``"B: Liver"`` -> ``"Liver"``; plain text unchanged."""
    return _LETTER_PREFIX.sub("", str(choice), count=1).strip()


def strict_answer(prediction: str) -> str | None:
    """The answer the strict protocol reads: :func:`extract_answer`, else the whole output cleaned.

    >>> strict_answer("<think>air under the diaphragm</think><answer>\\\\boxed{Yes}</answer>")
    'Yes'
    >>> strict_answer("yes")
    'yes'
    """
    if not isinstance(prediction, str):
        return None
    found = extract_answer(prediction)
    return found if found is not None else clean_answer(prediction[:20_000])


def _judge_strict(prediction: str, answer: str, answer_type: str, choices: Sequence[str] | None) -> bool:
    pred = strict_answer(prediction)
    options = None
    if answer_type == "CHOICE":
        if choices is not None:
            options = [{"letter": chr(ord("A") + i), "content": _option_text(c)} for i, c in enumerate(choices)]
        elif len(answer.strip().strip("()")) == 1 and answer.strip().strip("()").isalpha():
            # letter answer, option texts unknown: letters only (text answers then never match)
            options = [{"letter": chr(ord("A") + i), "content": ""} for i in range(26)]
    return answer_scores(pred, answer, answer_type, options)["acc"] == 1.0


# --------------------------------------------------------------------------- public


def judge(
    protocol: str,
    dataset: str,
    prediction: str,
    answer: str,
    answer_type: str,
    *,
    choices: Sequence[str] | None = None,
    rng: random.Random | None = None,
) -> bool:
    """Whether ``prediction`` (a model's whole output) answers ``answer`` under ``protocol``.

    Args:
        protocol: ``"medevalkit"`` or ``"strict"`` (see the module docstring).
        dataset: the row's ``data_source``; ``medevalkit`` needs one of :data:`DATASETS`.
        prediction: the decoded model output.
        answer: the ground truth as the dataset gives it (``reward_model.ground_truth``).
        answer_type: ``"OPEN"``, ``"CLOSED"`` or ``"CHOICE"``.
        choices: the option list, as MedEvalKit builds it for the dataset (``"A. text"`` for
            OmniMedVQA / MedXpertQA, PMC-VQA's raw option strings, option texts for MMMU);
            required by ``medevalkit`` on multiple-choice datasets; ``strict`` reads the option
            text after any ``"A."`` prefix and, without choices, matches letters only.
        rng: ``medevalkit`` on ``mmmu_med`` only: the random source of MMMU's guess for an
            unparsed response (default: the ``random`` module, as MMMU does).

    Raises:
        ValueError: unknown protocol or answer type; ``medevalkit`` outside :data:`DATASETS` or on a
            multiple-choice dataset without ``choices``; ``medevalkit`` MMMU open questions.

    >>> out = "<think>The pleura holds air.</think><answer>\\\\boxed{Yes}</answer>"
    >>> judge("medevalkit", "slake", out, "Yes", "CLOSED"), judge("strict", "slake", out, "Yes", "CLOSED")
    (True, True)
    >>> judge("medevalkit", "slake", "the lung", "Lung", "OPEN"), judge("strict", "slake", "the lung", "Lung", "OPEN")
    (False, True)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol not in protocols_for(dataset):
        raise ValueError(f"medevalkit judges only {DATASETS}, got {dataset!r} (use strict)")
    atype = str(answer_type or "").strip().upper()
    if atype not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    prediction = "" if prediction is None else str(prediction)
    answer = str(answer)
    if protocol == "strict":
        return _judge_strict(prediction, answer, atype, choices)
    return _judge_medevalkit(dataset, prediction, answer, atype, choices, rng)


def judge_both(
    dataset: str,
    prediction: str,
    answer: str,
    answer_type: str,
    *,
    choices: Sequence[str] | None = None,
    rng: random.Random | None = None,
) -> dict[str, bool]:
    """``{protocol: verdict}`` for every protocol of :func:`protocols_for` (both on MedEvalKit's
    seven datasets, where both are always reported; ``strict`` alone on any other)."""
    return {p: judge(p, dataset, prediction, answer, answer_type, choices=choices, rng=rng) for p in protocols_for(dataset)}


def token_f1(prediction: str, answer: str) -> TokenF1:
    """Strict token overlap of the strict answer read from ``prediction`` with ``answer``.

    Word tokens after lower-casing and dropping punctuation and articles (multiset counts), via
    :func:`vitos_verl.rewards.answers.token_scores`; zeros when no answer is read.

    >>> token_f1("<answer>left lung</answer>", "lung")
    TokenF1(precision=0.5, recall=1.0, f1=0.6666666666666666)
    """
    pred = strict_answer(prediction)
    if pred is None:
        return TokenF1(0.0, 0.0, 0.0)
    return TokenF1(*token_scores(pred, str(answer)))


def medevalkit_token_f1(response: str, answer: str) -> TokenF1:
    """MedEvalKit's ``calculate_f1`` on its parsed response, values under their right names.

    Token *sets* of whitespace-split, lower-cased text (punctuation kept: "lung." is not "lung"),
    on the response as ``judge_open_end_vqa`` sees it (``parse_response`` applied). Where
    MedEvalKit returns a bare ``0`` (an empty side; it then crashes unpacking it) this gives zeros.

    >>> medevalkit_token_f1("left lung", "lung")
    TokenF1(precision=0.5, recall=1.0, f1=0.6666666666666666)
    """
    out = _mek_calculate_f1(_mek_parse_response(str(response)), str(answer).lower())
    if out == 0:
        return TokenF1(0.0, 0.0, 0.0)
    f1, precision, recall = out  # type: ignore[misc]
    return TokenF1(float(precision), float(recall), float(f1))


def medevalkit_reported_token_scores(response: str, answer: str) -> dict[str, float]:
    """The ``precision`` / ``recall`` / ``f1`` keys exactly as MedEvalKit reports them (swapped).

    ``judge_open_end_vqa`` writes ``precision, recall, f1 = calculate_f1(...)``, which returns
    ``(f1, precision, recall)``: its "precision" is F1, "recall" is precision, "f1" is recall.

    >>> medevalkit_reported_token_scores("left lung", "lung")
    {'precision': 0.6666666666666666, 'recall': 0.5, 'f1': 1.0}
    """
    s = medevalkit_token_f1(response, answer)
    return {"precision": s.f1, "recall": s.precision, "f1": s.recall}
