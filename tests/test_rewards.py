"""Rewards on real SLAKE / VQA-RAD records and on the shapes real models emit."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitos_verl.pruning import box_to_resized, image_geometry
from vitos_verl.rewards import SCORE_KEYS, compute_score, extract_answer, parse_boxes, token_scores
from vitos_verl.rewards.answers import answer_scores


def slake_boxes(slake_dir, limit=60):
    """(image_size, [x1, y1, x2, y2]) of real SLAKE boxes, original pixels."""
    from PIL import Image

    out = []
    for folder in sorted((slake_dir / "imgs").iterdir()):
        det = json.loads((folder / "detection.json").read_text())
        if not det:
            continue
        with Image.open(folder / "source.jpg") as im:
            size = im.size
        for item in det:
            for _, (x, y, w, h) in item.items():
                out.append((size, [x, y, x + w, y + h]))
        if len(out) >= limit:
            break
    return out


@pytest.mark.parametrize(
    "fmt",
    [
        "<box>[{:.1f}, {:.1f}, {:.1f}, {:.1f}]</box>",
        "<|box_start|>({:.1f},{:.1f}),({:.1f},{:.1f})<|box_end|>",
        '```json\n[{{"bbox_2d": [{:.1f}, {:.1f}, {:.1f}, {:.1f}], "label": "lesion"}}]\n```',
        '{{"bbox_2d": [{:.1f}, {:.1f}, {:.1f}, {:.1f}]}}',
    ],
)
def test_iou_of_exact_answer_is_one_on_real_boxes(slake_dir, fmt):
    """A model that answers the ground-truth box in the resized frame gets IoU ~1 in every format."""
    for size, gt in slake_boxes(slake_dir):
        g = image_geometry(*size)
        r = box_to_resized(gt, g)
        out = compute_score("slake", fmt.format(*r), "x", {"stream": "grounding", "image_size": size, "gt_boxes": [gt]})
        assert out["iou"] > 0.97, (size, gt, r, out)  # rounding to 0.1 px only
        assert out["parsed"] == 1.0


def test_frame_confusion_is_penalised(slake_dir):
    """With a training pixel budget, a box in original pixels misses; the same box in the resized frame hits."""
    budget = 28 * 28 * 256
    cases = [(s, b) for s, b in slake_boxes(slake_dir, 400) if image_geometry(*s, max_pixels=budget).scale[0] < 0.8]
    assert len(cases) > 20, "need SLAKE images larger than the pixel budget"
    wrong = right = 0.0
    for size, gt in cases:
        info = {"stream": "grounding", "image_size": size, "gt_boxes": [gt]}
        r = box_to_resized(gt, image_geometry(*size, max_pixels=budget))
        fmt = "<box>[{:.1f}, {:.1f}, {:.1f}, {:.1f}]</box>"
        wrong += compute_score("slake", fmt.format(*gt), "x", info, max_pixels=budget)["iou"] / len(cases)
        right += compute_score("slake", fmt.format(*r), "x", info, max_pixels=budget)["iou"] / len(cases)
    assert right > 0.97 and wrong < 0.6, (right, wrong)


def test_xmlab102_lung_cancer_box(slake_dir):
    det = json.loads((slake_dir / "imgs" / "xmlab102" / "detection.json").read_text())
    x, y, w, h = det[0]["Lung Cancer"]
    assert [x, y, x + w, y + h] == [289, 301, 306, 323]


def test_parse_box_shapes():
    assert parse_boxes("<box>[40, 30, 10, 20]</box>") == [[10.0, 20.0, 40.0, 30.0]]  # swapped corners
    two = parse_boxes("<box>[0,0,10,10]</box> and <box>[20,20,30,30]</box>")
    assert len(two) == 2
    assert parse_boxes("<box>[-20, 5, 400, 50]</box>", image_size=(280, 280)) == [[0.0, 5.0, 280.0, 50.0]]
    assert parse_boxes("<box>[100, 200, 500, 600]</box>", "norm1000", (280, 560)) == [[28.0, 112.0, 140.0, 336.0]]
    assert parse_boxes("<box>[nan, 1, 2, 3]</box>") == []
    assert parse_boxes("<box>[1, 2, 3]</box>") == []
    with pytest.raises(ValueError):
        parse_boxes("<box>[0.1,0.1,0.2,0.2]</box>", "norm1")


@pytest.mark.parametrize(
    "text",
    ["", "<box>" * 5000, "<box><box>[1,2</box>", "[" * 10000, "<answer>" * 3000, "x" * 200_000, "<box>[1e999, 0, 1, 1]</box>", "\x00\uffff"],
)
@pytest.mark.parametrize("stream", ["grounding", "reasoning"])
def test_garbage_gives_finite_zero(text, stream):
    info = {"stream": stream, "image_size": [512, 512], "gt_boxes": [[289, 301, 306, 323]], "feedback_acc": float("nan")}
    out = compute_score("slake", text, "yes", info)
    assert set(out) == set(SCORE_KEYS)
    assert all(math.isfinite(v) for v in out.values())
    assert out["score"] == 0.0 and out["iou"] == 0.0 and out["acc"] == 0.0


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_text_never_raises(text):
    for stream in ("grounding", "reasoning"):
        out = compute_score("vqa_rad", text, "no", {"stream": stream, "image_size": [640, 480]})
        assert all(math.isfinite(v) for v in out.values())


def test_missing_image_size_gives_zero():
    out = compute_score("slake", "<box>[1, 2, 3, 4]</box>", "x", {"stream": "grounding"})
    assert out["score"] == 0.0 and out["keep_ratio"] == 1.0


def test_grounding_weights_and_feedback():
    info = {"stream": "grounding", "image_size": [512, 512], "gt_boxes": [[289, 301, 306, 323]]}
    g = image_geometry(512, 512)
    r = [round(v) for v in box_to_resized([289, 301, 306, 323], g)]
    text = "<box>[{}, {}, {}, {}]</box>".format(*r)
    base = compute_score("slake", text, "x", info, w_iou=1.0, w_fb=1.0, w_fmt=0.5, w_keep=0.0)
    fb = compute_score("slake", text, "x", {**info, "feedback_acc": 0.75}, w_iou=1.0, w_fb=2.0, w_fmt=0.5)
    assert fb["score"] == pytest.approx(base["score"] + 1.5)
    keep = compute_score("slake", text, "x", info, w_keep=1.0)
    assert keep["score"] == pytest.approx(base["score"] - keep["keep_ratio"])
    assert 0 < keep["keep_ratio"] < 0.05
    bad = compute_score("slake", "the lesion is in the left lung", "x", {**info, "feedback_acc": 1.0})
    assert bad["format"] == 0 and bad["iou"] == 0 and bad["keep_ratio"] == 1.0 and bad["score"] == 0.0
    nogt = compute_score("vqa_rad", text, "x", {"stream": "grounding", "image_size": [512, 512], "feedback_acc": 1.0})
    assert nogt["has_gt_box"] == 0 and nogt["iou"] == 0 and nogt["score"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        compute_score("slake", text, "x", {"stream": "both"})


def test_reasoning_accuracy_on_real_vqa_rad(vqa_rad_dir):
    """Every VQA-RAD test answer, echoed in each answer form, scores acc 1; another answer scores 0."""
    recs = json.loads((vqa_rad_dir / "testset.json").read_text())
    for rec in recs:
        gt, atype = str(rec["answer"]), rec["answer_type"].strip()
        for form in ("<think>..</think><answer>{}</answer>", "\\boxed{{{}}}", "The answer is {}."):
            out = compute_score("vqa_rad", form.format(gt.upper()), gt, {"stream": "reasoning", "answer_type": atype})
            assert out["acc"] == 1.0, (form, gt)
        wrong = "maybe" if gt.lower() != "maybe" else "no"
        assert compute_score("vqa_rad", f"<answer>{wrong}</answer>", gt, {"answer_type": atype})["acc"] == 0.0


def test_closed_and_choice_and_open():
    assert answer_scores("Yes, there is an effusion", "yes", "CLOSED")["acc"] == 1.0
    assert answer_scores("yes and no", "yes", "CLOSED")["acc"] == 0.0
    opts = [{"letter": "A", "content": "Capsular plication"}, {"letter": "B", "content": "Radial head ORIF"}]
    assert answer_scores("(B)", "B", "CHOICE", opts)["acc"] == 1.0
    assert answer_scores("radial head orif", "B", "CHOICE", opts)["acc"] == 1.0
    assert answer_scores("A. Capsular plication", "B", "CHOICE", opts)["acc"] == 0.0
    s = answer_scores("the left lung", "left lung lobe", "OPEN")
    assert s["acc"] == 0.0 and s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(0.8)
    # recall is over ground-truth tokens, F1 the harmonic mean (MedEvalKit swaps the two)
    p, r, f = token_scores("lung", "left lung")
    assert (p, r) == (1.0, 0.5) and f == pytest.approx(2 / 3)
    assert extract_answer("<answer><answer>liver</answer></answer>") == "liver"
    assert extract_answer("<answer>   </answer>") is None


def test_reasoning_format_reward():
    ok = compute_score("slake", "<think>brain, T2</think>\n<answer>MRI</answer>", "MRI", {"stream": "reasoning"})
    assert ok["format"] == 1.0 and ok["acc"] == 1.0 and ok["score"] == pytest.approx(1.5)
    nested = compute_score("slake", "<think><think>x</think></think><answer>MRI</answer>", "MRI", {"stream": "reasoning"})
    assert nested["format"] == 0.0 and nested["acc"] == 1.0


# Reading answers as a reader would


@pytest.mark.parametrize(
    "text",
    [
        "<think>R1 style</think><answer>\\boxed{Lung}</answer>",
        "<think>.</think><answer>$\\boxed{\\text{Lung}}$</answer>",
        "<think>.</think><answer> \\( \\mathrm{lung} \\). </answer>",
        "<think>.</think><answer>The organ is \\boxed{lung}.</answer>",
        "so the final answer is $\\boxed{\\text{Lung}}$.",
        "The answer is \\text{Lung}.",
    ],
)
def test_latex_wrapped_answers_are_read(text):
    out = compute_score("slake", text, "Lung", {"stream": "reasoning", "answer_type": "OPEN"})
    assert out["acc"] == 1.0 and out["parsed"] == 1.0, text
    if text.startswith("<think>"):
        assert out["format"] == 1.0 and out["score"] == pytest.approx(1.5)


def test_closed_answer_in_boxed_text():
    out = compute_score("vqa_rad", "<think>.</think><answer>\\boxed{\\text{No}}</answer>", "no", {"answer_type": "CLOSED"})
    assert out["acc"] == 1.0 and out["format"] == 1.0


@pytest.mark.parametrize("inner", ["", "   ", "\n\t", "\\boxed{}", "$ $", "\\boxed{\\text{ }}", "."])
def test_empty_answer_earns_no_format_credit(inner):
    text = f"<think>the image shows the chest</think><answer>{inner}</answer>"
    out = compute_score("slake", text, "yes", {"stream": "reasoning"})
    assert out["format"] == 0.0 and out["score"] == 0.0 and out["parsed"] == 0.0
    assert extract_answer(text) is None


def test_last_answer_is_read_past_a_cut_off_one():
    # a length-capped output: the second "answer is" has nothing after it
    assert extract_answer("The answer is lung. To check, the answer is ") == "lung"
    assert extract_answer("answer is: \\boxed{A} then \\boxed{") == "A"  # an unclosed box is skipped


def test_box_off_the_image_earns_no_format_credit(slake_dir):
    """A box that covers no part of the image: no format credit, no IoU, nothing parsed, keep ratio 1."""
    for size, gt in slake_boxes(slake_dir, 10):
        W, H = image_geometry(*size).resized_size
        info = {"stream": "grounding", "image_size": size, "gt_boxes": [gt], "feedback_acc": 0.5}
        for box in ([W + 10, 10, W + 60, 50], [10, -80, 60, -20], [-50, -50, -1, -1], [20, 20, 20, 60]):
            out = compute_score("slake", "<box>[{}, {}, {}, {}]</box>".format(*box), "x", info)
            assert out["format"] == 0.0 and out["parsed"] == 0.0 and out["iou"] == 0.0 and out["keep_ratio"] == 1.0, box
            assert out["score"] == pytest.approx(0.0)  # nothing (no_feedback, the default)
        inside = compute_score("slake", f"<think>edge</think><box>[{W - 30}, 0, {W + 400}, 30]</box>", "x", info)
        assert inside["format"] == 1.0 and inside["parsed"] == 1.0  # partly outside: clipped, kept
        norm = compute_score("slake", "<box>[1010, 10, 1200, 50]</box>", "x", info, box_format="norm1000")
        assert norm["format"] == 0.0 and norm["parsed"] == 0.0


@pytest.mark.parametrize("rule, feedback", [("keep_all", 0.75), ("keep_min", 0.75), ("no_feedback", 0.0)])
def test_unparsed_box_rule_sets_feedback(rule, feedback):
    info = {"stream": "grounding", "image_size": [512, 512], "gt_boxes": [[289, 301, 306, 323]], "feedback_acc": 0.75}
    for text in ("no box here", "<box>[900, 900, 950, 950]</box>", "<box>[1, 2, 3]</box>"):
        out = compute_score("slake", text, "x", info, unparsed_box=rule, w_keep=0.5)
        assert out["feedback"] == out["acc"] == feedback and out["format"] == 0.0 and out["keep_ratio"] == 1.0
        assert out["score"] == pytest.approx(feedback - 0.5)  # w_fb * feedback - w_keep * 1.0
    good = compute_score("slake", "<box>[280, 290, 320, 330]</box>", "x", info, unparsed_box=rule)
    assert good["feedback"] == 0.75  # a parsed box earns its feedback under every rule
    with pytest.raises(ValueError, match="unparsed_box"):
        compute_score("slake", "no box", "x", info, unparsed_box="keep_none")


def test_pruned_feedback_scale_puts_both_safe_boxes_below_a_guess(tmp_path):
    """vitos.feedback_scale: on the controlled task's images (224 px, the evidence one quadrant),
    with the answer accuracies measured from each box (docs/learning.md section 4), the plain
    cross-feedback ranks the whole-image box above a guessed quadrant; crediting the feedback by
    the tokens pruned (``pruned``) puts both the whole image and a tiny box below the guess, the
    right box still far above, and leaves the reported feedback the answers' accuracy."""
    from data_prep import sparse_evidence

    sparse_evidence.generate(tmp_path, seed=3, n_train=4, n_val=1)
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    kw = {"margin_cells": 1, "min_pixels": 3136, "max_pixels": 50176}
    for row in rows:
        info = {**row["extra_info"], "stream": "grounding"}
        gt = [int(v) for v in info["gt_boxes"][0]]
        quadrants = [[x, y, x + 112, y + 112] for y in (0, 112) for x in (0, 112)]
        boxes = {"right": (gt, 0.9), "whole": ([0, 0, 224, 224], 0.7), "tiny": ([0, 0, 14, 14], 0.25)}
        for scale in ("none", "pruned"):
            s = {k: compute_score("sparse_evidence", "<box>[{}, {}, {}, {}]</box>".format(*b), "", {**info, "feedback_acc": a},
                                  feedback_scale=scale, **kw) for k, (b, a) in boxes.items()}  # fmt: skip
            # a guess: each quadrant once, the answers right only from the right one
            guess = np.mean([compute_score("sparse_evidence", "<box>[{}, {}, {}, {}]</box>".format(*q), "",
                                           {**info, "feedback_acc": 0.9 if q == gt else 0.0}, feedback_scale=scale, **kw)["score"]
                             for q in quadrants])  # fmt: skip
            assert s["whole"]["feedback"] == 0.7 and s["whole"]["keep_ratio"] == 1.0
            if scale == "none":
                assert s["whole"]["score"] > guess
            else:
                assert s["whole"]["score"] < guess and s["tiny"]["score"] < guess < s["right"]["score"] - 1.0
    with pytest.raises(ValueError, match="feedback_scale"):
        compute_score("slake", "<box>[0, 0, 10, 10]</box>", "x", {"stream": "grounding", "image_size": [64, 64]}, feedback_scale="x")
