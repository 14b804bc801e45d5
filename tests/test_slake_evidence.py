"""The SLAKE box rules on SLAKE's own labels and question wording (data_prep.slake_evidence)."""

from __future__ import annotations

import math

import pytest

from data_prep.slake_evidence import DetBox, mentions, parse_detection, select_boxes, select_evidence, select_legacy


def _dets(*labels: str) -> list[DetBox]:
    return [DetBox(lab, (10.0 * i, 10.0 * i, 10.0 * i + 5, 10.0 * i + 5)) for i, lab in enumerate(labels)]


CHEST_CT = _dets("Left Lung", "Right Lung", "Heart", "Lung Cancer", "Spinal Cord")
ABDOMEN = _dets("Liver", "Spleen", "Left Kidney", "Right Kidney", "Liver Cancer", "Small Bowel")
HEAD = _dets("Brain Stem", "Left Ear", "Right Ear", "Left Eye", "Right Eye", "Left Temporal Lobe")
BRAIN_MRI = _dets("Brain Edema", "Brain Enhancing Tumor", "Brain Non-enhancing Tumor")


def _labels(question, answer, dets, **kw):
    sel = select_evidence(question, answer, dets, **kw)
    return sel.rule, sorted(sel.labels)


@pytest.mark.parametrize(
    ("question", "answer", "dets", "expected"),
    [
        # the cases: the organ asked about, not whatever the image has
        ("Does the picture contain spleen?", "Yes", ABDOMEN, ["Spleen"]),
        ("Does the picture contain spleen?", "No", _dets("Liver"), []),
        ("What is the largest organ in the picture?", "Lung", CHEST_CT, ["Left Lung", "Right Lung"]),
        ("What is the largest organ in the picture?", "Lung", _dets("Lung Cancer"), []),
        ("How many ears are shown in this image?", "2", HEAD, ["Left Ear", "Right Ear"]),
        # plurals, sides (patient's side in SLAKE's text and labels alike), synonyms, typos
        ("How many kidneys in this image?", "2", ABDOMEN, ["Left Kidney", "Right Kidney"]),
        ("What color does the left kidney show in the picture?", "Gray", ABDOMEN, ["Left Kidney"]),
        ("Which is smaller in this image, liver or right kidney?", "Right Kidney", ABDOMEN, ["Liver", "Right Kidney"]),
        ("Is there small intestine in this image?", "Yes", ABDOMEN, ["Small Bowel"]),
        ("Does the picture contain eyes?", "Yes", HEAD, ["Left Eye", "Right Eye"]),
        # a finding named in the question or answer; the longer term wins ("lung cancer" is not "lung")
        ("Where is the lung cancer?", "Left Lung", CHEST_CT, ["Lung Cancer"]),
        ("What diseases are included in the picture?", "Liver Cancer", ABDOMEN, ["Liver Cancer"]),
        ("Where is the brain tumor?", "Left Lobe", BRAIN_MRI, ["Brain Enhancing Tumor", "Brain Non-enhancing Tumor"]),
        ("Where is the pulmonary infiltration in this image?", "Lower Left Lung", _dets("Infiltrate"), ["Infiltrate"]),
        # an abnormality question: the findings of the organ it names (else every finding)
        ("Is the lung healthy?", "No", CHEST_CT, ["Lung Cancer"]),
        ("Is the liver healthy?", "Yes", _dets("Liver", "Spleen"), ["Liver"]),
        ("Which organ is abnormal, heart or lung?", "Heart", _dets("Cardiomegaly"), ["Cardiomegaly"]),
        (
            "Is this image normal?",
            "No",
            BRAIN_MRI,
            ["Brain Edema", "Brain Enhancing Tumor", "Brain Non-enhancing Tumor"],
        ),
        ("Do the spleen look abnormal?", "No", ABDOMEN, ["Spleen"]),
        # a finding the question names but the image lacks: no other finding stands in
        ("Can pneumonia be observed on the lower left lung in this picture?", "No", _dets("Nodule"), []),
        # no box is the evidence: none (the legacy rule gave every box)
        ("What modality is used to take this image?", "CT", CHEST_CT, []),
        ("Which part of the body does this image belong to?", "Chest", CHEST_CT, []),
        ("Does the picture contain brian?", "Yes", BRAIN_MRI, []),
    ],
)
def test_evidence_rule(question, answer, dets, expected):
    rule, labels = _labels(question, answer, dets)
    assert labels == sorted(expected)
    assert rule == ("named" if expected else "none")


def test_slake_fields_content_type_and_triple():
    # content_type "Abnormality" and a disease relation mark an abnormality question
    q = "What kind of symptoms will the disease on the heart in this image bring to the patient?"
    assert _labels(q, "Chest tightness", _dets("Cardiomegaly"), triple=["vhead", "symptom", "ktail"])[1] == [
        "Cardiomegaly"
    ]
    # a knowledge tail names organs; not when the answer is No
    q = "Does the picture contain the organ which has the effect of excreting feces?"
    dets = _dets("Bladder", "Rectum")
    assert _labels(q, "Yes", dets, triple=["vhead", "effect", "excrete feces"]) == ("named", ["Rectum"])
    assert _labels(q, "No", dets, triple=["vhead", "effect", "excrete feces"]) == ("none", [])
    # a tail outside the table: nothing
    q = "Does the picture contain the organ that could be used for secreting enzymes?"
    assert _labels(q, "Yes", ABDOMEN, triple=["vhead", "be used for", "secrete enzymes"]) == ("none", [])


def test_no_boxes_and_unknown_labels():
    assert select_evidence("Where is the liver?", "Left", []).how == "no_boxes"
    # a label outside the vocabulary table is matched by its whole text, as the legacy rule does
    sel = select_evidence("Where is the gallbladder?", "Right", _dets("Gallbladder", "Liver"))
    assert sel.labels == ["Gallbladder"] and sel.how == "label"


def test_legacy_rule_kept():
    assert select_legacy("What is the largest organ in the picture?", "Lung", _dets("Lung Cancer")).rule == "all"
    sel = select_legacy("Where is the lung cancer?", "Left", CHEST_CT)
    assert (sel.rule, sel.labels) == ("named", ["Lung Cancer"])
    assert select_boxes("legacy", "Is this a CT?", "Yes", CHEST_CT).labels == [d.label for d in CHEST_CT]
    with pytest.raises(ValueError, match="box rule"):
        select_boxes("nearest", "q", "a", CHEST_CT)


def test_mentions_sides_and_plurals():
    found, abnormal = mentions("Can nodule be observed on the upper right lung in this picture?")
    assert [(m.entity.name, m.side) for m in found] == [("nodule", ""), ("lung", "right")]
    assert not abnormal
    found, abnormal = mentions("Are there abnormalities in this image?")
    assert found == [] and abnormal


def test_parse_detection_bad_entries():
    dets = parse_detection(
        [{"Liver": [1, 2, 3, 4]}, {"Spleen": [math.nan, 0, 5, 5]}, {"Heart": [0, 0, 0, 5]}, {"X": "a"}]
    )
    assert dets[0] == DetBox("Liver", (1.0, 2.0, 4.0, 6.0))
    assert [d.box for d in dets[1:]] == [None, None, None] and all(d.problem for d in dets[1:])
    with pytest.raises(ValueError, match="expected a list"):
        parse_detection({"data": []})
    with pytest.raises(ValueError, match="not an object"):
        parse_detection([["Liver", [1, 2, 3, 4]]])
