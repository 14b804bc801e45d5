"""Converters on the real release layouts in ../shared/data, and on an HF-layout parquet built from real images."""

from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import pathvqa, slake, vqa_rad
from data_prep.common import SCHEMA


def test_slake_test_split(slake_test_parquet):
    t = pq.read_table(slake_test_parquet)
    assert t.num_rows == 1052  # English rows with an image present (README of the data)
    assert t.schema.equals(SCHEMA)
    rows = t.to_pylist()
    info = [r["extra_info"] for r in rows]
    assert {i["lang"] for i in info} == {"en"}
    assert {i["answer_type"] for i in info} <= {"OPEN", "CLOSED"}
    summary = json.loads((slake_test_parquet.parent / "summary.json").read_text())["splits"]["test"]
    assert summary["rows_in"] == 2094 and summary["rows_out"] == 1052
    assert summary["skipped"] == {"missing_image": 9}
    assert summary["filtered"] == {"lang_zh": 1033}
    # xmlab102's one box, Lung Cancer, [x, y, w, h] -> [x1, y1, x2, y2] in original pixels: attached
    # where it is the evidence ("What diseases...?", "Is the lung healthy?"), not to "Does the
    # picture contain lung?" or "What is the largest organ?" (Lung)
    r102 = {r["extra_info"]["question"]: r["extra_info"] for r in rows if r["images"][0]["path"] == "xmlab102/source.jpg"}
    lung_cancer = [[289.0, 301.0, 306.0, 323.0]]
    for q in ("What diseases are included in the picture?", "Is the lung healthy?", "Where is/are the abnormality located?"):
        assert r102[q]["gt_boxes"] == lung_cancer and r102[q]["box_labels"] == ["Lung Cancer"], q
    for q in ("Does the picture contain lung?", "What is the largest organ in the picture?", "What modality is used to take this image?"):
        assert r102[q]["gt_boxes"] == [] and r102[q]["box_rule"] == "none", q
    # every image is embedded and decodes to its recorded size; boxes lie inside it
    for r in rows[::50]:
        im = Image.open(io.BytesIO(r["images"][0]["bytes"]))
        assert list(im.size) == r["extra_info"]["image_size"]
        W, H = im.size
        for x1, y1, x2, y2 in r["extra_info"]["gt_boxes"]:
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
    # the evidence rule: boxes of the organ or finding asked about, else none (never "all")
    assert summary["box_rules"] == {"named": 411, "none": 641, "all": 0}
    assert summary["notes"]["box_evidence_no_boxes"] == 72  # images whose detection.json is []
    assert {i["box_rule"] for i in info} == {"named", "none"}
    assert all(bool(i["gt_boxes"]) == (i["box_rule"] == "named") for i in info)
    for i in info:
        q = i["question"].lower()
        if q.startswith("does the picture contain spleen"):
            assert set(i["box_labels"]) <= {"Spleen"}, i
        if q.startswith("what is the largest organ") and i["answer"] == "Lung":
            assert "Lung Cancer" not in i["box_labels"], i
        if "ears" in q and i["answer"] in ("Yes", "White"):
            assert set(i["box_labels"]) == {"Left Ear", "Right Ear"}, i
    # both streams' prompts come from the same record
    r = rows[0]
    assert r["prompt"][0]["content"].startswith("<image>") and r["extra_info"]["question"] in r["prompt"][0]["content"]
    assert "<answer>" in r["reasoning_prompt"][0]["content"] and "<box>" in r["prompt"][0]["content"]


def test_slake_legacy_box_rule(slake_dir, tmp_path):
    """``--box-rule legacy``: the former rule (label named, else every box), kept for comparison."""
    s = slake.main(["--src", str(slake_dir), "--out", str(tmp_path), "--splits", "test", "--box-rule", "legacy"])
    t = s["splits"]["test"]
    assert t["rows_out"] == 1052 and t["box_rules"] == {"named": 204, "none": 72, "all": 776}
    assert s["options"]["box_rule"] == "legacy"
    rows = pq.read_table(tmp_path / "test.parquet").to_pylist()
    r102 = [r for r in rows if r["images"][0]["path"] == "xmlab102/source.jpg"]
    assert r102 and all(r["extra_info"]["gt_boxes"] == [[289.0, 301.0, 306.0, 323.0]] for r in r102)
    named = [r["extra_info"] for r in rows if r["extra_info"]["box_rule"] == "named"]
    assert all(any(lab.lower() in (i["question"] + " " + i["answer"]).lower() for lab in i["box_labels"]) for i in named)


def test_slake_idempotent_and_all_splits(slake_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    s1 = slake.main(["--src", str(slake_dir), "--out", str(a), "--splits", "train,val", "--limit", "200"])
    slake.main(["--src", str(slake_dir), "--out", str(a), "--splits", "train,val", "--limit", "200"])
    slake.main(["--src", str(slake_dir), "--out", str(b), "--splits", "train,val", "--limit", "200"])
    assert (a / "train.parquet").read_bytes() == (b / "train.parquet").read_bytes()
    assert s1["splits"]["train"]["rows_in"] == 9835
    assert s1["splits"]["train"]["rows_out"] == 200
    # 4,776 English rows with an image; one of them has an empty answer (qid 1622): counted, not kept
    assert s1["splits"]["train"]["skipped"] == {"empty_question_or_answer": 1, "missing_image": 143}
    assert s1["splits"]["train"]["filtered"]["limit"] == 4775 - 200


def test_slake_bad_inputs_counted(slake_dir, tmp_path):
    """Corrupt image, malformed record and detection, box partly outside the image: counted, not fatal."""
    src = tmp_path / "slake"
    (src / "imgs").mkdir(parents=True)
    for n in ("xmlab102", "xmlab1", "xmlab2"):
        shutil.copytree(slake_dir / "imgs" / n, src / "imgs" / n)
    (src / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (src / "imgs" / "xmlab2" / "detection.json").write_text('{"oops": 1')
    (src / "imgs" / "xmlab102" / "detection.json").write_text(json.dumps([{"Lung Cancer": [500.0, 500.0, 40.0, 40.0]}]))
    recs = [
        {"img_name": "xmlab102/source.jpg", "question": "Where is the lung cancer?", "answer": "Left", "q_lang": "en"},
        {"img_name": "xmlab1/source.jpg", "question": "What modality?", "answer": "CT", "q_lang": "en"},
        {"img_name": "xmlab2/source.jpg", "question": "What organ?", "answer": "Brain", "q_lang": "en"},
        {"img_name": "xmlab2/source.jpg", "question": "", "answer": "Brain", "q_lang": "en"},
        {"question": "no image?", "answer": "x"},
        {"img_name": "xmlab999/source.jpg", "question": "q", "answer": "a", "q_lang": "en"},
    ]
    (src / "test.json").write_text(json.dumps(recs))
    s = slake.main(["--src", str(src), "--out", str(tmp_path / "out"), "--splits", "test"])["splits"]["test"]
    assert s["rows_in"] == 6 and s["rows_out"] == 1
    assert s["skipped"] == {
        "corrupt_image": 1,
        "empty_question_or_answer": 1,
        "malformed_detection": 1,  # xmlab2's boxes are unknown: its question is not written without them
        "malformed_record": 1,
        "missing_image": 1,
    }
    assert s["notes"]["boxes_clipped"] == 1
    rows = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert rows[0]["extra_info"]["gt_boxes"] == [[500.0, 500.0, 512.0, 512.0]]


def test_vqa_rad(vqa_rad_dir, tmp_path):
    s = vqa_rad.main(["--src", str(vqa_rad_dir), "--out", str(tmp_path)])["splits"]
    assert s["train"]["rows_out"] == 1797 and s["train"]["rows_in"] == 3064
    assert s["test"]["rows_out"] + sum(s["test"]["filtered"].values()) == 451
    t = pq.read_table(tmp_path / "test.parquet").to_pylist()
    assert {r["extra_info"]["answer_type"] for r in t} == {"OPEN", "CLOSED"}
    assert all(r["extra_info"]["gt_boxes"] == [] and r["extra_info"]["box_rule"] == "none" for r in t)


def test_pathvqa_release_without_images_counts_everything(data_dir, tmp_path):
    s = pathvqa.main(["--src", str(data_dir / "pathvqa_qa"), "--out", str(tmp_path), "--splits", "val"])["splits"]["val"]
    n_q = sum(len(r["sentf"]["pvqa"]) for r in json.loads((data_dir / "pathvqa_qa" / "pvqa_val.json").read_text()))
    assert s["rows_in"] == n_q and s["rows_out"] == 0 and s["skipped"] == {"missing_image": n_q}


def test_hf_parquet_layout_from_real_images(vqa_rad_dir, tmp_path):
    """The layout most users download: image bytes + question + answer, split in the file name."""
    recs = json.loads((vqa_rad_dir / "testset.json").read_text())[:12]
    rows = [
        {
            "image": {"bytes": (vqa_rad_dir / "images" / r["image_name"]).read_bytes(), "path": r["image_name"]},
            "question": r["question"],
            "answer": str(r["answer"]),
        }
        for r in recs
    ]
    rows[3]["image"] = {"bytes": b"garbage", "path": "x.jpg"}
    rows[4]["answer"] = ""
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), src / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), src / "train-00000-of-00001.parquet")
    s = pathvqa.main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--splits", "train,test"])
    assert s["layout"] == "hf_parquet"
    t = s["splits"]["test"]
    assert t["rows_in"] == 12 and t["rows_out"] == 10
    assert t["skipped"] == {"corrupt_image": 1, "empty_question_or_answer": 1}
    out = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert out[0]["data_source"] == "pathvqa"
    assert out[0]["extra_info"]["answer_type"] == ("CLOSED" if rows[0]["answer"].lower() in ("yes", "no") else "OPEN")
    with pytest.raises(ValueError, match="no parquet for split"):
        pathvqa.main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o2"), "--splits", "val"])


def test_missing_src_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        slake.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path)])


def test_every_cli_flag_belongs_to_its_converter():
    """--lang filters SLAKE's questions; VQA-RAD and PathVQA have one language and no --lang."""
    import contextlib
    import io

    from data_prep import pathvqa, slake, vqa_rad

    for mod, has_lang in ((slake, True), (vqa_rad, False), (pathvqa, False)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            mod.main(["--help"])
        assert ("--lang" in out.getvalue()) == has_lang, mod.__name__
