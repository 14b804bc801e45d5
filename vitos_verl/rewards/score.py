"""verl ``compute_score`` entry for both ViToS streams.

Rewards (docs/design.md section 1, item 4; weights are config, defaults are this project's
choice since the paper's values are not public):

* reasoning: ``r_r = acc + w_fmt * format_r``
* grounding: ``r_g = w_iou * IoU [gt boxes only] + w_fb * feedback_acc + w_fmt * format_g
  - w_keep * keep_ratio + w_acc * answer_acc_g``

``feedback_acc`` (cross-feedback) is the mean accuracy of the reasoning answers produced
from this grounding sample's box; the trainer puts it in ``extra_info["feedback_acc"]``.
``answer_acc_g`` is the accuracy of the grounding output's *own* answer
(``<think>..</think><box>[..]</box><answer>..</answer>``: the output of the authors' stage 1,
whose reward combines answer accuracy, format, grounding overlap and the answers made from the
box; README of github.com/JLINEkai/ViToS), scored like the reasoning answer against the ground
truth. ``w_acc = 0`` (the default) leaves the grounding reward as it was; above 0 the grounding
prompt asks for the answer and the grounding format needs it. Every sample reports its own
answer's accuracy as ``answer_acc`` (0 for a grounding output without one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from vitos_verl.pruning import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PATCH_SIZE,
    ImageGeometry,
    box_to_resized,
    image_geometry,
)
from vitos_verl.pruning.boxes import MAX_TEXT_CHARS, best_iou, parse_boxes
from vitos_verl.pruning.plan import DEFAULT_UNPARSED_BOX, UNPARSED_BOX_RULES, Frames, PlanConfig, plan
from vitos_verl.records import STREAMS
from vitos_verl.rewards.answers import answer_scores, clean_answer, extract_answer

# What a grounding output without a box that covers part of the image (none, unparseable, or
# off the image) earns, under the rules of vitos_verl.pruning.plan.UNPARSED_BOX_RULES (which say
# what the answers see). Such a sample never earns IoU or format credit, and its keep ratio is
# charged as 1.0 (the whole image) under every rule, so a missing box is never cheaper than the
# largest box.
#   keep_all, keep_min: the box earns w_fb * the accuracy of its answers.
#   no_feedback:        the box earns no feedback (0); the reasoning stream trains on its answers
#                       as usual.
# The templates' shapes, checked on stripped text by format_score (linear time: literal searches
# and possessive quantifiers; see vitos_verl.pruning.boxes).
_INT_OR_DEC = r"\s*+[-+]?\d++(?:\.\d++)?\s*+"
_BOX_TAIL = re.compile(rf"<box>\s*+\[{_INT_OR_DEC},{_INT_OR_DEC},{_INT_OR_DEC},{_INT_OR_DEC}\]\s*+</box>")

# compute_score's keyword arguments that the grounding reward takes (the reasoning one takes w_fmt)
_GROUNDING_KWARGS = (
    "w_iou", "w_fb", "w_fmt", "w_keep", "w_acc", "iou_mode", "box_format", "margin_cells", "min_keep_ratio", "min_pixels", "max_pixels",
    "unparsed_box", "feedback_scale",
)  # fmt: skip

#: How the answers' accuracy is credited to their box (``vitos.feedback_scale``): ``none`` (the
#: paper's cross-feedback: ``w_fb * feedback``) or ``pruned`` (``w_fb * feedback * (1 - keep_ratio)``:
#: a box earns its answers' accuracy in proportion to the visual tokens it pruned).
FEEDBACK_SCALES = ("none", "pruned")

# One key set for every sample so verl can batch reward_extra_info across both streams.
# ``acc``: the reasoning answer's accuracy; for a grounding sample the cross-feedback (as ``feedback``).
# ``answer_acc``: the accuracy of the sample's own <answer> (grounding: the one after its box, 0 without one).
SCORE_KEYS = (
    "score", "acc", "format", "iou", "keep_ratio", "feedback", "recall", "f1", "has_gt_box", "parsed", "answer_acc",
)  # fmt: skip


def _grounding_format(s: str, image_size: tuple[int, int] | None, box_format: str, answer: bool = False) -> bool:
    """``[<think>..</think>] <box>[x1, y1, x2, y2]</box>`` (integers or decimals), nothing else;
    with ``answer``, followed by ``<answer>..</answer>`` (a non-empty answer, no nested tags)."""
    if answer:
        if not s.endswith("</answer>"):
            return False
        a = s.rfind("<answer>")
        if a < 0 or "</answer>" in s[a + 8 : -9] or clean_answer(s[a + 8 : -9]) is None:
            return False
        s = s[:a].rstrip()
    if not s.endswith("</box>"):
        return False
    k = s.rfind("<box>")  # the template's box has no "<box>" inside: it starts at the last one
    if k < 0 or not _BOX_TAIL.fullmatch(s, k):
        return False
    head = s[:k].rstrip()
    if head and not (len(head) >= 15 and head.startswith("<think>") and head.endswith("</think>")):
        return False
    if answer and ("<answer>" in head or "</answer>" in head):
        return False
    return image_size is None or bool(parse_boxes(s[k:], box_format=box_format, image_size=image_size))


def _reasoning_format(s: str) -> bool:
    """``<think>..</think> <answer>..</answer>``: no nested tags, a non-empty answer."""
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    j = s.find("</think>", 7)
    if j < 0 or s.find("<think>", 7, j) >= 0:
        return False
    rest = s[j + 8 :].lstrip()
    if len(rest) < 18 or not rest.startswith("<answer>"):
        return False
    content = rest[8:-9]
    if "<answer>" in content or "</answer>" in content:
        return False
    return clean_answer(content) is not None


def format_score(
    text: str, stream: str, *, image_size: tuple[int, int] | None = None, box_format: str = "abs", answer: bool = False
) -> float:
    """1.0 when the output follows the stream's template exactly, else 0.0.

    grounding: ``<box>[x1, y1, x2, y2]</box>``, optionally after ``<think>..</think>``; with
    ``answer`` (the prompt asked for it: ``w_acc > 0``) followed by a non-empty
    ``<answer>..</answer>``; with ``image_size`` (``(W, H)`` of the resized image; the box in
    ``box_format``) the box must also cover part of the image (a box off the image earns nothing). reasoning:
    ``<think>..</think><answer>..</answer>`` without nested tags, with an answer left after
    :func:`~vitos_verl.rewards.answers.clean_answer` (``<answer>   </answer>`` earns nothing).
    Space around and between the parts is allowed; longer than :data:`MAX_TEXT_CHARS`: 0.0.
    Linear in the length of the text.

    >>> format_score("<box>[10, 20, 110, 140]</box>", "grounding")
    1.0
    >>> format_score("<box>[600, 20, 700, 140]</box>", "grounding", image_size=(504, 504))
    0.0
    >>> format_score("<think>the left lung</think><box>[0.1, 0.2, 0.4, 0.6]</box><answer>yes</answer>", "grounding",
    ...              image_size=(504, 504), box_format="norm1", answer=True)
    1.0
    >>> format_score("<think>a mass in the right lobe</think><answer>liver</answer>", "reasoning")
    1.0
    >>> format_score("<think>R1 style</think><answer>\\\\boxed{liver}</answer>", "reasoning")
    1.0
    >>> format_score("<think>no idea</think><answer>   </answer>", "reasoning")
    0.0
    >>> format_score("liver", "reasoning")
    0.0
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return 0.0
    s = text.strip()
    ok = _grounding_format(s, image_size, box_format, answer) if stream == "grounding" else _reasoning_format(s)
    return 1.0 if ok else 0.0


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _size(v: Any) -> tuple[int, int] | None:
    try:
        w, h = (int(x) for x in v)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def own_answer_acc(solution_str: str, ground_truth: str, extra_info: Mapping[str, Any]) -> dict[str, float]:
    """The accuracy of an output's own ``<answer>`` against ``ground_truth`` (:func:`answer_scores`
    with the row's ``answer_type`` and ``options``): ``{"acc", "recall", "f1", "parsed"}``; all 0
    for an output without an answer."""
    pred = extract_answer(solution_str)
    sc = answer_scores(pred, ground_truth, str(extra_info.get("answer_type") or "OPEN"), extra_info.get("options"))
    return {**sc, "parsed": float(pred is not None)}


def grounding_score(
    solution_str: str,
    extra_info: Mapping[str, Any],
    *,
    ground_truth: str = "",
    w_iou: float = 1.0,
    w_fb: float = 1.0,
    w_fmt: float = 0.5,
    w_keep: float = 0.0,
    w_acc: float = 0.0,
    iou_mode: str = "best",
    box_format: str = "abs",
    margin_cells: int = 0,
    min_keep_ratio: float = 0.0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    unparsed_box: str = DEFAULT_UNPARSED_BOX,
    feedback_scale: str = "none",
) -> dict[str, float]:
    """Grounding reward of one sample; see the module docstring.

    ``extra_info`` needs ``image_size`` = ``(W, H)`` of the original image; optional
    ``gt_boxes`` (original pixels, ``[[x1, y1, x2, y2], ...]``), ``resized_size`` (the frame the
    grounding stream saw, else computed with ``smart_resize(min_pixels, max_pixels)``),
    ``feedback_acc`` and ``keep_ratio`` (the trainer's planned mask's ratio,
    :meth:`vitos_verl.trainer.dual_stream.ReasoningPlan.grounding_keep_ratios`: the fraction of
    tokens the answers saw; else the mask of the box, :func:`vitos_verl.pruning.plan.plan` in the
    grounding frame). The predicted box is the union of all boxes in the output that cover part of
    the image, in resized pixels (:attr:`vitos_verl.pruning.plan.Plan.box_grounding`); the ground
    truth is mapped into that frame before the IoU. An output without such a box (``parsed = 0``) earns no IoU and no format credit, is charged
    ``keep_ratio = 1.0``, and earns feedback as ``unparsed_box`` says
    (:data:`UNPARSED_BOX_RULES`: ``no_feedback`` gives 0, the others ``feedback_acc``).

    ``feedback_scale`` (:data:`FEEDBACK_SCALES`): with ``pruned`` the score credits the feedback
    times ``1 - keep_ratio``, so a box over the whole image earns none of it and a box that keeps
    few tokens earns nearly all (``feedback`` in the returned dict stays the answers' accuracy).
    With the plain credit, a box over the whole image, whose answers see every token, scores above
    a guessed box whenever the full image answers better than a guess, and no ``w_keep`` keeps
    both it and a tiny box below a guess on the controlled task (docs/learning.md section 4).

    The output's own answer (after its box) is scored against ``ground_truth`` like a reasoning
    answer (:func:`own_answer_acc`) and reported as ``answer_acc``; it enters the score as
    ``w_acc * answer_acc``, and with ``w_acc > 0`` (the prompt asked for it) the format needs it.
    It is scored whether or not the output held a box.

    Raises:
        ValueError: ``unparsed_box`` not in :data:`UNPARSED_BOX_RULES`, ``feedback_scale`` not in
            :data:`FEEDBACK_SCALES` (and the config errors of
            :func:`compute_score`).
    """
    if unparsed_box not in UNPARSED_BOX_RULES:
        raise ValueError(f"unparsed_box must be one of {UNPARSED_BOX_RULES}, got {unparsed_box!r}")
    if feedback_scale not in FEEDBACK_SCALES:
        raise ValueError(f"feedback_scale must be one of {FEEDBACK_SCALES}, got {feedback_scale!r}")
    orig = _size(extra_info.get("image_size"))
    if orig is None:
        return _zero(keep=1.0)
    # the grounding frame: the one the trainer recorded (resized_size), else the budget's
    geom = image_geometry(*orig, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = _size(extra_info.get("resized_size")) or geom.resized_size
    if resized != geom.resized_size:
        geom = ImageGeometry(orig, resized, (1, resized[1] // PATCH_SIZE, resized[0] // PATCH_SIZE))
    # the box and its mask as the planner makes them, in that one frame (the reward is not told
    # the reasoning frame: its keep ratio is the trainer's, below, when there is one)
    rule = PlanConfig("tokens", box_format, margin_cells, min_keep_ratio, unparsed_box)
    planned_box = plan(solution_str, Frames.same(geom), rule)
    pred = planned_box.box_grounding
    gt = [box_to_resized(b, geom) for b in (extra_info.get("gt_boxes") or []) if len(b) == 4]
    has_gt = bool(gt)
    iou_v = best_iou(pred, gt, iou_mode) if (pred is not None and has_gt) else 0.0
    planned = _finite(extra_info.get("keep_ratio"), -1.0)
    kr = planned if (pred is not None and 0.0 < planned <= 1.0) else planned_box.charged_keep_ratio
    fb = _finite(extra_info.get("feedback_acc"), 0.0)
    if pred is None and unparsed_box == "no_feedback":
        fb = 0.0
    answer = w_acc > 0
    fmt = format_score(solution_str, "grounding", image_size=resized, box_format=box_format, answer=answer) if pred is not None else 0.0
    own = own_answer_acc(solution_str, ground_truth, extra_info)["acc"]
    credit = fb * (1.0 - kr) if feedback_scale == "pruned" else fb
    score = w_iou * iou_v + w_fb * credit + w_fmt * fmt - w_keep * kr + w_acc * own
    return {
        "score": score,
        "acc": fb,
        "format": fmt,
        "iou": iou_v,
        "keep_ratio": kr,
        "feedback": fb,
        "recall": 0.0,
        "f1": 0.0,
        "has_gt_box": float(has_gt),
        "parsed": float(pred is not None),
        "answer_acc": own,
    }


def reasoning_score(
    solution_str: str, ground_truth: str, extra_info: Mapping[str, Any], *, w_fmt: float = 0.5
) -> dict[str, float]:
    """Reasoning reward of one sample: ``acc + w_fmt * format``; see :func:`answer_scores`."""
    pred = extract_answer(solution_str)
    sc = answer_scores(pred, ground_truth, str(extra_info.get("answer_type") or "OPEN"), extra_info.get("options"))
    fmt = format_score(solution_str, "reasoning")
    return {
        "score": sc["acc"] + w_fmt * fmt,
        "acc": sc["acc"],
        "format": fmt,
        "iou": 0.0,
        "keep_ratio": _finite(extra_info.get("keep_ratio"), 1.0),
        "feedback": 0.0,
        "recall": sc["recall"],
        "f1": sc["f1"],
        "has_gt_box": float(bool(extra_info.get("gt_boxes"))),
        "parsed": float(pred is not None),
        "answer_acc": sc["acc"],
    }


def _zero(keep: float = 1.0) -> dict[str, float]:
    out = dict.fromkeys(SCORE_KEYS, 0.0)
    out["keep_ratio"] = keep
    return out


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward function (``custom_reward_function.name=compute_score``).

    Args:
        data_source: dataset name (``slake``, ``vqa_rad``, ``pathvqa``...); logged only.
        solution_str: decoded model response.
        ground_truth: the dataset answer (``reward_model.ground_truth``).
        extra_info: the row's ``extra_info``; ``stream`` selects ``"grounding"`` or
            ``"reasoning"`` (default reasoning). See :func:`grounding_score`.
        **kwargs: reward weights and geometry from config (``w_iou``, ``w_fb``, ``w_fmt``,
            ``w_keep``, ``w_acc``, ``iou_mode``, ``box_format``, ``margin_cells``, ``min_keep_ratio``,
            ``min_pixels``, ``max_pixels``, ``unparsed_box``); unknown keys are ignored.

    Returns:
        Dict with every key of :data:`SCORE_KEYS`, all finite floats. Bad model output
        (empty, huge, nested tags, NaN) gives zeros, never an exception.

    Raises:
        ValueError: an unknown ``stream`` or invalid config values (``box_format``,
            ``iou_mode``, ``margin_cells``, ``min_keep_ratio``, ``unparsed_box``):
            configuration errors.

    >>> info = {"stream": "grounding", "image_size": [504, 504], "gt_boxes": [[289, 301, 306, 323]]}
    >>> compute_score("slake", "<box>[289, 301, 306, 323]</box>", "CT", info)["iou"]  # 504 px: no resize
    1.0
    >>> info["image_size"] = [1008, 1008]  # resized to 980x980: the model answers in that frame
    >>> compute_score("slake", "<box>[281.0, 292.6, 297.5, 314.0]</box>", "CT", info)["iou"] > 0.99
    True
    >>> compute_score("slake", "<think>.</think><answer>ct</answer>", "CT", {"stream": "reasoning"})["score"]
    1.5
    """
    info = dict(extra_info or {})
    stream = info.get("stream", "reasoning")
    if stream not in STREAMS:
        raise ValueError(f"extra_info['stream'] must be one of {STREAMS}, got {stream!r}")
    if stream == "grounding":
        kw = {k: kwargs[k] for k in _GROUNDING_KWARGS if k in kwargs}
        out = grounding_score(solution_str, info, ground_truth=ground_truth, **kw)
    else:
        out = reasoning_score(solution_str, ground_truth, info, **{k: kwargs[k] for k in ("w_fmt",) if k in kwargs})
    return {k: _finite(v) for k, v in out.items()}
