"""Both scoring protocols of vitos_verl.eval.protocols on real-looking model outputs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vitos_verl.eval.protocols import (
    MEDEVALKIT_COMMIT,
    TokenF1,
    judge,
    judge_both,
    medevalkit_reported_token_scores,
    medevalkit_token_f1,
    token_f1,
)

R1_YES = "<think>Air is seen under the right hemidiaphragm.</think><answer>\\boxed{Yes}</answer>"


def both(*args, **kw):
    return judge_both(*args, **kw)


@pytest.mark.parametrize(
    ("dataset", "pred", "gt", "atype", "expected"),
    [
        # agreement
        ("slake", R1_YES, "Yes", "CLOSED", {"medevalkit": True, "strict": True}),
        ("slake", "<think>..</think><answer>Lung</answer>", "Lung", "OPEN", {"medevalkit": True, "strict": True}),
        ("slake", "Yes.", "Yes", "CLOSED", {"medevalkit": True, "strict": True}),  # "." removed on closed
        ("vqa_rad", "yes", "yes", "CLOSED", {"medevalkit": True, "strict": True}),  # untagged plain
        ("vqa_rad", "<answer>No</answer>", "yes", "CLOSED", {"medevalkit": False, "strict": False}),
        ("pathvqa", R1_YES, "yes", "CLOSED", {"medevalkit": True, "strict": True}),
        # MedEvalKit quirks
        ("slake", "the lung", "Lung", "OPEN", {"medevalkit": False, "strict": True}),  # articles
        ("slake", "<answer>Lung.</answer>", "Lung", "OPEN", {"medevalkit": False, "strict": True}),  # "." kept
        ("slake", "The answer is: Lung.", "Lung", "OPEN", {"medevalkit": False, "strict": True}),  # ": lung."
        ("slake", "<answer>Yes, it is.</answer>", "Yes", "CLOSED", {"medevalkit": False, "strict": True}),
        ("vqa_rad", "<answer>Yes, a nodule.</answer>", "yes", "CLOSED", {"medevalkit": False, "strict": True}),
        ("vqa_rad", "<answer>not enlarged</answer>", "no", "CLOSED", {"medevalkit": True, "strict": False}),
        ("vqa_rad", "<answer>Left.</answer>", "left", "CLOSED", {"medevalkit": False, "strict": True}),
    ],
)
def test_open_closed(dataset, pred, gt, atype, expected):
    assert both(dataset, pred, gt, atype) == expected


def test_answer_is_with_colon_on_closed():
    # MedEvalKit keeps the ": " after "answer is"; its closed rule removes "." only.
    assert both("slake", "The answer is: Yes.", "Yes", "CLOSED") == {"medevalkit": False, "strict": True}
    # the yes/no rule is a substring rule, so the colon does not matter there
    assert both("vqa_rad", "The answer is: Yes.", "yes", "CLOSED") == {"medevalkit": True, "strict": True}


OMNI = ["A. Lung", "B. Liver", "C. Kidney", "D. Heart"]


@pytest.mark.parametrize("dataset", ["omnimedvqa", "medxpertqa_mm", "pmc_vqa", "mmmu_med"])
@pytest.mark.parametrize("pred", ["B", "(B) Liver", "<think>hepatic lesion</think><answer>B</answer>"])
def test_choice_agree(dataset, pred):
    choices = ["Lung", "Liver", "Kidney", "Heart"] if dataset == "mmmu_med" else OMNI
    assert both(dataset, pred, "B", "CHOICE", choices=choices) == {"medevalkit": True, "strict": True}
    assert both(dataset, pred, "C", "CHOICE", choices=choices, rng=random.Random(0))["strict"] is False


def test_choice_quirks():
    # unparsed text: MedEvalKit takes the most similar option, strict wants letter or option text
    pred = "<answer>It is probably hepatic, so liver</answer>"
    assert both("omnimedvqa", pred, "B", "CHOICE", choices=OMNI) == {"medevalkit": True, "strict": False}
    assert both("omnimedvqa", "<answer>Liver</answer>", "B", "CHOICE", choices=OMNI)["strict"] is True
    # strict without choices: letters only
    assert judge("strict", "pmc_vqa", "(B) Liver", "B", "CHOICE") is True
    with pytest.raises(ValueError, match="choices"):
        judge("medevalkit", "pmc_vqa", "B", "B", "CHOICE")


def test_mmmu_random_guess_is_seeded():
    choices = ["Lung", "Liver", "Kidney", "Heart"]
    a = [
        judge("medevalkit", "mmmu_med", "no idea", "A", "CHOICE", choices=choices, rng=random.Random(s))
        for s in range(20)
    ]
    b = [
        judge("medevalkit", "mmmu_med", "no idea", "A", "CHOICE", choices=choices, rng=random.Random(s))
        for s in range(20)
    ]
    assert a == b and any(a) and not all(a)


def test_bad_arguments():
    for args in (
        ("x", "slake", "y", "y", "OPEN"),
        ("medevalkit", "sparse_evidence", "y", "y", "OPEN"),  # MedEvalKit has no rule for it
        ("strict", "slake", "y", "y", "X"),
    ):
        with pytest.raises(ValueError):
            judge(*args)


def test_a_dataset_outside_medevalkit_is_judged_by_the_strict_protocol_alone():
    out = "<think>a disc in the lower left</think><answer>Yellow</answer>"
    assert judge_both("sparse_evidence", out, "yellow", "CLOSED") == {"strict": True}
    assert judge_both("sparse_evidence", out, "green", "CLOSED") == {"strict": False}
    assert set(judge_both("slake", out, "yellow", "CLOSED")) == {"medevalkit", "strict"}


def test_token_f1_names():
    assert token_f1("<answer>the left lung</answer>", "Lung") == TokenF1(precision=0.5, recall=1.0, f1=2 / 3)
    assert token_f1("", "lung") == TokenF1(0.0, 0.0, 0.0)
    assert medevalkit_token_f1("left lung", "Lung") == TokenF1(0.5, 1.0, 2 / 3)
    assert medevalkit_token_f1("left lung.", "lung") == TokenF1(0.0, 0.0, 0.0)  # "lung." != "lung"
    assert medevalkit_token_f1("", "lung") == TokenF1(0.0, 0.0, 0.0)  # MedEvalKit: bare 0
    assert medevalkit_reported_token_scores("left lung", "lung") == {"precision": 2 / 3, "recall": 0.5, "f1": 1.0}
    assert len(MEDEVALKIT_COMMIT) == 40


@pytest.fixture(scope="module")
def vqa_rad_test_parquet(vqa_rad_dir, tmp_path_factory) -> Path:
    from data_prep import vqa_rad

    out = tmp_path_factory.mktemp("vqa_rad")
    vqa_rad.main(["--src", str(vqa_rad_dir), "--out", str(out), "--splits", "test"])
    return out / "test.parquet"


@pytest.mark.parametrize("name", ["slake", "vqa_rad"])
def test_real_answers(name, request):
    """Every test-split ground truth of the real data, converted by data_prep."""
    import pyarrow.parquet as pq

    path = request.getfixturevalue(f"{name}_test_parquet")
    df = pq.read_table(path, columns=["reward_model", "extra_info"]).to_pydict()
    df = {"reward_model": df["reward_model"], "extra_info": df["extra_info"]}
    n_diff = 0
    for rm, info in zip(df["reward_model"], df["extra_info"]):
        gt, atype = str(rm["ground_truth"]), str(info["answer_type"]).upper()
        # the ground truth itself, R1-style: right under both protocols
        out = f"<think>looking</think><answer>\\boxed{{{gt}}}</answer>"
        assert both(name, out, gt, atype) == {"medevalkit": True, "strict": True}, (gt, atype)
        # with a final full stop: strict always right, MedEvalKit wrong on open answers
        v = both(name, f"<answer>{gt}.</answer>", gt, atype)
        assert v["strict"] is True, gt
        n_diff += v["medevalkit"] != v["strict"]
    assert n_diff > 0
