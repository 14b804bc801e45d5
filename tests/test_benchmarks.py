"""The evaluation-benchmark converters (PMC-VQA, OmniMedVQA, MMMU Health & Medicine, MedXpertQA
MM) on small fixtures written in each release's real format, with real JPEG/PNG images made by
Pillow; MedXpertQA MM and PathVQA read the real question text in ../shared/data."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import medxpertqa_mm, mmmu_med, omnimedvqa, pathvqa, pmc_vqa
from data_prep.common import SCHEMA, DataPrepError, SourceFileError
from vitos_verl.data.prompts import to_content_list
from vitos_verl.eval.protocols import DATASETS, judge


def _image(size: tuple[int, int], fmt: str = "JPEG", shade: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (shade, 120, 160)).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path, size=(64, 48), fmt="JPEG", shade=90) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _image(size, fmt, shade)
    path.write_bytes(data)
    return data


def _accounted(s: dict) -> None:
    assert s["rows_in"] == s["rows_out"] + sum(s["skipped"].values()) + sum(s["filtered"].values())


def _read(out, split):
    t = pq.read_table(out / f"{split}.parquet")
    assert t.schema.equals(SCHEMA)
    return t.to_pylist()


def _placeholders(row) -> tuple[int, int]:
    return row["prompt"][0]["content"].count("<image>"), row["reasoning_prompt"][0]["content"].count("<image>")


# ----------------------------------------------------------------------------------- PMC-VQA

V2 = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "split"]
V1 = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_pmc_vqa_v2_and_clean_test(tmp_path):
    src = tmp_path / "PMC-VQA"
    src.mkdir()
    fig1 = _write_image(src / "figures" / "PMC1064097_F1.jpg", (80, 60))
    _write_image(src / "figures" / "PMC2_F2.jpg", (70, 50), shade=30)
    abc = ["A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern", "D:Cannot determine, really"]
    _csv(
        src / "test_2.csv",
        V2,
        [
            [
                0,
                "PMC1064097_F1.jpg",
                "A caption, with a comma.",
                "What is the uptake pattern in the breast?",
                *abc,
                "B",
                "test",
            ],
            [
                1,
                "PMC2_F2.jpg",
                "cap",
                "Which view?",
                " A:Axial",
                " B:Coronal",
                " C:Sagittal",
                " D:Oblique",
                "C",
                "test",
            ],
            [2, "absent.jpg", "cap", "What stain?", "A:H&E", "B:PAS", "C:Gram", "D:Silver", "A", "test"],
            [3, "PMC2_F2.jpg", "cap", "Which organ?", "A:Lung", "B:Liver", "C:Heart", "D:Brain", "E", "test"],
            [4, "PMC2_F2.jpg", "cap", "Which side?", "A:Left", "B:Right", "C:Both", "D:Neither", "B:Right", "test"],
        ],
    )
    out = tmp_path / "out"
    s = pmc_vqa.main(["--src", str(src), "--out", str(out)])
    t = s["splits"]["test"]
    _accounted(t)
    assert s["options"]["splits"] == "test" and s["layout"] == "release"
    assert t["rows_in"] == 5 and t["rows_out"] == 3
    assert t["skipped"] == {"answer_not_an_option": 1, "missing_image": 1}
    assert t["notes"] == {"answer_matched_by_text": 1}
    assert t["image_counts"] == {"1": 3}
    rows = _read(out, "test")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["B", "C", "B"]
    assert [r["extra_info"]["record_id"] for r in rows] == ["0", "1", "4"]
    r0 = rows[0]
    assert r0["data_source"] == "pmc_vqa" and r0["extra_info"]["answer_type"] == "CHOICE"
    assert [o["content"] for o in r0["extra_info"]["options"]][3] == "Cannot determine, really"
    assert r0["extra_info"]["choices"] == abc  # the raw cells, as MedEvalKit passes them to its judge
    assert (
        rows[1]["extra_info"]["choices"][0] == " A:Axial" and rows[1]["extra_info"]["options"][0]["content"] == "Axial"
    )
    assert r0["images"][0]["bytes"] == fig1 and r0["extra_info"]["image_size"] == [80, 60]
    assert "(B) Focal uptake pattern" in r0["reasoning_prompt"][0]["content"] and _placeholders(r0) == (1, 1)
    info = r0["extra_info"]
    assert judge("medevalkit", "pmc_vqa", "B", info["answer"], "CHOICE", choices=info["choices"])

    # version 1 clean test set: Answer_label is the letter, images under images/
    img = _write_image(src / "images" / "PMC9_F1.png", (50, 50), "PNG")
    _csv(
        src / "test_clean.csv",
        V1,
        [["PMC9_F1.png", "Which organ?", "Liver", "A:Lung", "B:Liver", "C:Heart", "D:Brain", "B"]],
    )
    s = pmc_vqa.main(["--src", str(src), "--out", str(tmp_path / "clean"), "--splits", "test_clean"])
    assert s["splits"]["test_clean"]["rows_out"] == 1
    r = _read(tmp_path / "clean", "test_clean")[0]
    assert r["reward_model"]["ground_truth"] == "B" and r["images"][0]["bytes"] == img

    (src / "bad.csv").write_text("Figure_path,Question\nx.jpg,q\n")
    with pytest.raises(SourceFileError, match="lacks the columns"):
        pmc_vqa.load_split(src, "bad.csv")
    with pytest.raises(SourceFileError, match="test.csv: split file missing"):
        pmc_vqa.main(["--src", str(src), "--out", str(tmp_path / "v1"), "--splits", "test_v1"])


# -------------------------------------------------------------------------------- OmniMedVQA


def _omni(dataset, qid, question, gt, image, options, **extra):
    rec = {
        "dataset": dataset,
        "question_id": qid,
        "question_type": "Modality Recognition",
        "question": question,
        "gt_answer": gt,
        "image_path": image,
        "modality_type": "CT",
    }
    rec.update({f"option_{k}": v for k, v in zip("ABCD", options)})
    rec.update(extra)
    return rec


def test_omnimedvqa_open_access(tmp_path):
    src = tmp_path / "OmniMedVQA"
    qa = src / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    ct = _write_image(src / "Images" / "Chest CT Scan" / "test" / "a.png", (64, 64), "PNG")
    _write_image(src / "Images" / "ACRIMA" / "b.jpg", (60, 40))
    chest = [
        _omni(
            "Chest CT Scan",
            "Chest CT Scan_0",
            "What modality is used?",
            "CT",
            "Images/Chest CT Scan/test/a.png",
            ["MRI", "CT", "X-ray", "PET"],
        ),
        _omni(
            "Chest CT Scan", "Chest CT Scan_1", "Is it normal?", "No", "Images/Chest CT Scan/test/a.png", ["Yes", "No"]
        ),
        _omni(
            "Chest CT Scan",
            "Chest CT Scan_2",
            "Which finding?",
            "Nodule",
            "Images/Chest CT Scan/test/a.png",
            ["Mass", "Effusion", "Cyst"],
        ),
        _omni(
            "Chest CT Scan",
            "Chest CT Scan_3",
            "What modality?",
            "CT",
            "Images/Chest CT Scan/test/gone.png",
            ["CT", "MR"],
        ),
    ]
    chest[1].pop("modality_type")
    chest[1]["modality"] = "CT"  # the one record said to use this key
    acrima = [
        _omni(
            "ACRIMA",
            "ACRIMA_0",
            "Is there glaucoma?",
            "glaucoma ",
            "Images/ACRIMA/b.jpg",
            ["no glaucoma", "Glaucoma"],
            modality_type="Fundus Photography",
        ),
        "not a record",
    ]
    (qa / "Chest CT Scan.json").write_text(json.dumps(chest))
    (qa / "ACRIMA.json").write_text(json.dumps(acrima))
    out = tmp_path / "out"
    s = omnimedvqa.main(["--src", str(src), "--out", str(out)])["splits"]["test"]
    _accounted(s)
    assert s["rows_in"] == 6 and s["rows_out"] == 3
    assert s["skipped"] == {"answer_not_an_option": 1, "malformed_record": 1, "missing_image": 1}
    assert s["notes"] == {"answer_matched_loosely": 1}
    rows = _read(out, "test")
    by_id = {r["extra_info"]["record_id"]: r for r in rows}
    assert list(by_id) == [
        "ACRIMA/ACRIMA_0",
        "Chest CT Scan/Chest CT Scan_0",
        "Chest CT Scan/Chest CT Scan_1",
    ]  # files sorted
    r = by_id["Chest CT Scan/Chest CT Scan_0"]
    assert r["reward_model"]["ground_truth"] == "B" and r["images"][0]["bytes"] == ct
    assert r["extra_info"]["choices"] == ["A. MRI", "B. CT", "C. X-ray", "D. PET"]
    assert r["extra_info"]["modality"] == "CT" and r["extra_info"]["question_type"] == "Modality Recognition"
    two = by_id["Chest CT Scan/Chest CT Scan_1"]["extra_info"]
    assert [o["letter"] for o in two["options"]] == ["A", "B"] and two["answer"] == "B" and two["modality"] == "CT"
    assert by_id["ACRIMA/ACRIMA_0"]["extra_info"]["answer"] == "B"
    assert judge("medevalkit", "omnimedvqa", "<answer>B</answer>", "B", "CHOICE", choices=r["extra_info"]["choices"])
    with pytest.raises(SourceFileError, match="folder of OmniMedVQA QA files missing"):
        omnimedvqa.main(["--src", str(tmp_path), "--out", str(tmp_path / "o2")])


# ------------------------------------------------------------------------------------- MMMU

_IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    + [(f"image_{k}", _IMG) for k in range(1, 8)]
    + [
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
)


def _mmmu(rid, question, options, answer, images=(), qtype="multiple-choice"):
    rec = {
        "id": rid,
        "question": question,
        "options": repr(list(options)),
        "explanation": "",
        "img_type": "['Body Scans: MRI, CT.']",
        "answer": answer,
        "topic_difficulty": "Medium",
        "question_type": qtype,
        "subfield": "Radiology",
    }
    for k in range(1, 8):
        rec[f"image_{k}"] = images[k - 1] if k <= len(images) and images[k - 1] is not None else None
    return rec


def _mmmu_files(src, part, subject, recs):
    (src / subject).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs, schema=MMMU_SCHEMA), src / subject / f"{part}-00000-of-00001.parquet")


def test_mmmu_med_validation_multi_image(tmp_path):
    src = tmp_path / "MMMU"
    imgs = [{"bytes": _image((40 + 8 * k, 40), "PNG", shade=20 * k), "path": f"img{k}.png"} for k in range(1, 4)]
    cm = "Clinical_Medicine"
    _mmmu_files(
        src,
        "validation",
        cm,
        [
            _mmmu(f"validation_{cm}_1", "<image 1> What is shown?", ["Fracture", "Tumour", "Normal"], "C", imgs[:1]),
            _mmmu(
                f"validation_{cm}_2",
                "Compare <image 1> and <image 2>: which option?",
                ["<image 3>", "None of these"],
                "A",
                imgs,
            ),
            _mmmu(f"validation_{cm}_3", "How many mm is the lesion in <image 1>?", [], "12", imgs[:1], qtype="open"),
            _mmmu(f"validation_{cm}_4", "<image 1> vs <image 2>?", ["x", "y"], "A", [imgs[0], None]),
            _mmmu(f"validation_{cm}_5", "<image 1> Which?", ["x", "y"], "D", imgs[:1]),
        ],
    )
    _mmmu_files(
        src, "validation", "Pharmacy", [_mmmu("validation_Pharmacy_1", "<image 1> Drug?", ["a", "b"], "b", imgs[1:2])]
    )
    out = tmp_path / "out"
    s = mmmu_med.main(["--src", str(src), "--out", str(out), "--subjects", f"{cm},Pharmacy"])
    v = s["splits"]["val"]
    _accounted(v)
    assert v["rows_in"] == 6 and v["rows_out"] == 3
    assert v["filtered"] == {"open_question": 1}  # the medevalkit judge refuses MMMU open questions
    assert v["skipped"] == {"answer_not_an_option": 1, "missing_image": 1}
    assert v["image_counts"] == {"1": 2, "3": 1}
    rows = _read(out, "val")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["C", "A", "B"]
    multi = rows[1]
    assert [im["bytes"] for im in multi["images"]] == [im["bytes"] for im in imgs]  # every image, in order
    assert [im["path"] for im in multi["images"]] == ["img1.png", "img2.png", "img3.png"]
    assert _placeholders(multi) == (3, 3)
    assert multi["prompt"][0]["content"].startswith("<image><image><image>Compare <image 1> and <image 2>")
    parts = to_content_list(multi["reasoning_prompt"])[0]["content"]
    assert [p["type"] for p in parts[:4]] == ["image", "image", "image", "text"]
    assert multi["extra_info"]["image_size"] == [48, 40] and multi["extra_info"]["choices"] == [
        "<image 3>",
        "None of these",
    ]
    assert multi["extra_info"]["modality"] == "Body Scans: MRI, CT."
    assert _placeholders(rows[0]) == (1, 1)
    assert judge("medevalkit", "mmmu_med", r"\boxed{C}", "C", "CHOICE", choices=rows[0]["extra_info"]["choices"])

    kept = mmmu_med.main(
        ["--src", str(src), "--out", str(tmp_path / "k"), "--subjects", cm, "--open-questions", "keep"]
    )
    assert kept["splits"]["val"]["rows_out"] == 3 and kept["splits"]["val"]["filtered"] == {}
    open_row = [r for r in _read(tmp_path / "k", "val") if r["extra_info"]["answer_type"] == "OPEN"]
    assert [r["reward_model"]["ground_truth"] for r in open_row] == ["12"] and open_row[0]["extra_info"][
        "options"
    ] == []

    with pytest.raises(SourceFileError, match="Basic_Medical_Science: no validation"):
        mmmu_med.main(["--src", str(src), "--out", str(tmp_path / "o3")])
    with pytest.raises(DataPrepError, match="test answers are hidden"):
        mmmu_med.main(["--src", str(src), "--out", str(tmp_path / "o4"), "--splits", "test", "--subjects", cm])


def test_mmmu_med_test_split_with_medevalkit_answers(tmp_path):
    src = tmp_path / "MMMU"
    img = {"bytes": _image((50, 50)), "path": None}
    _mmmu_files(src, "test", "Pharmacy", [_mmmu("test_Pharmacy_1", "<image 1> Which?", ["a", "b", "c"], "?", [img])])
    answers = tmp_path / "answer.json"
    answers.write_text(json.dumps({"test_Pharmacy_1": {"question_type": "multiple-choice", "ground_truth": "C"}}))
    s = mmmu_med.main(
        [
            "--src",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--splits",
            "test",
            "--subjects",
            "Pharmacy",
            "--test-answers",
            str(answers),
        ]
    )
    assert s["splits"]["test"]["rows_out"] == 1
    r = _read(tmp_path / "o", "test")[0]
    assert r["reward_model"]["ground_truth"] == "C" and r["images"][0]["path"] == "test_Pharmacy_1/image_1"


# ----------------------------------------------------------------------------- MedXpertQA MM


def _medxpert_rows(data_dir, n=6):
    with open(data_dir / "medxpertqa_mm_text" / "medxpertqa_mm_input.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.mark.parametrize("layout", ["github", "hf"])
def test_medxpertqa_mm_real_text(data_dir, tmp_path, layout):
    recs = _medxpert_rows(data_dir)
    src = tmp_path / "MedXpertQA"
    written = {}
    for i, rec in enumerate(recs):
        for k, im in enumerate(rec["images"]):
            name = im["image_path"]
            if i == 2:  # this question's image is absent
                continue
            fmt = "PNG" if name.endswith(".png") else "JPEG"
            written[name] = _write_image(src / "images" / name, (56 + 4 * k, 48), fmt, shade=10 * k)
    if layout == "github":
        (src / "medxpertqa_mm_input.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:  # TsinghuaC3I/MedXpertQA: options {letter: text}, label a letter, images file names
        hf = [
            {
                **r,
                "options": {o["letter"]: o["content"] for o in r["options"]},
                "label": r["label"][0],
                "images": [im["image_path"] for im in r["images"]],
            }
            for r in recs
        ]
        (src / "MM").mkdir(parents=True)
        (src / "MM" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hf))
    out = tmp_path / "out"
    t = medxpertqa_mm.main(["--src", str(src), "--out", str(out)])["splits"]["test"]
    _accounted(t)
    assert t["rows_in"] == 6 and t["rows_out"] == 5 and t["skipped"] == {"missing_image": 1}
    rows = _read(out, "test")
    kept = [r for i, r in enumerate(recs) if i != 2]
    for row, rec in zip(rows, kept):
        info = row["extra_info"]
        assert info["record_id"] == rec["id"] and row["reward_model"]["ground_truth"] == rec["label"][0]
        assert info["options"] == rec["options"]
        assert info["choices"] == [f"{o['letter']}. {o['content']}" for o in rec["options"]]
        names = [im["image_path"] for im in rec["images"]]
        assert [im["path"] for im in row["images"]] == names
        assert [im["bytes"] for im in row["images"]] == [written[n] for n in names]
        assert _placeholders(row) == (len(names), len(names))
        assert info["organ"] == rec["body_system"]
    assert len(rows[0]["images"]) == 2  # MM-0: Figures A and B
    info = rows[0]["extra_info"]
    assert judge("medevalkit", "medxpertqa_mm", "<answer>A</answer>", info["answer"], "CHOICE", choices=info["choices"])


def test_medxpertqa_mm_images_flag_and_bad_records(data_dir, tmp_path):
    recs = _medxpert_rows(data_dir, 3)
    images = tmp_path / "imgs"
    for rec in recs:
        for im in rec["images"]:
            _write_image(images / im["image_path"], (40, 40))
    bad_label = {**recs[1], "id": "MM-x", "label": ["A", "B"]}
    bad_opts = {**recs[1], "id": "MM-y", "options": "A) one B) two"}
    src = tmp_path / "text"
    src.mkdir()
    lines = [json.dumps(r) for r in (recs[0], bad_label, bad_opts, recs[0], [1, 2])]
    (src / "medxpertqa_mm_input.jsonl").write_text("\n".join(lines) + "\n\n")
    s = medxpertqa_mm.main(["--src", str(src), "--images", str(images), "--out", str(tmp_path / "o")])["splits"]["test"]
    _accounted(s)
    assert s["rows_out"] == 1
    assert s["skipped"] == {"answer_not_an_option": 1, "duplicate_qid": 1, "malformed_record": 2}
    (src / "medxpertqa_mm_input.jsonl").write_text(lines[0] + "\n" + lines[0][:40])
    with pytest.raises(SourceFileError, match="line 2 is not valid JSON"):
        medxpertqa_mm.main(["--src", str(src), "--out", str(tmp_path / "o2")])
    with pytest.raises(SourceFileError, match="none of"):
        medxpertqa_mm.main(["--src", str(src), "--out", str(tmp_path / "o3"), "--splits", "dev"])


# ---------------------------------------------------------------------------------- PathVQA


def test_pathvqa_real_text_with_images_dir(data_dir, tmp_path):
    """The real LXMERT-layout val questions, with synthesised images for three image ids."""
    recs = json.loads((data_dir / "pathvqa_qa" / "pvqa_val.json").read_text())
    ids = ["val_0000", "val_0001", "val_0004"]
    for i, img_id in enumerate(ids):
        _write_image(tmp_path / "images" / "val" / f"{img_id}.jpg", (60 + i, 50))
    out = tmp_path / "out"
    s = pathvqa.main(
        [
            "--src",
            str(data_dir / "pathvqa_qa"),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(out),
            "--splits",
            "val",
        ]
    )["splits"]["val"]
    _accounted(s)
    by_id = {r["img_id"]: r for r in recs}
    n_with_images = sum(len(by_id[i]["sentf"]["pvqa"]) for i in ids)
    assert s["rows_out"] == n_with_images == 21
    assert s["skipped"] == {"missing_image": s["rows_in"] - n_with_images}
    rows = _read(out, "val")
    first = by_id["val_0000"]
    assert [r["extra_info"]["question"] for r in rows[:3]] == first["sentf"]["pvqa"][:3]
    assert [r["reward_model"]["ground_truth"] for r in rows[:3]] == [
        "candida organism",
        "pseudohyphae and budding yeasts",
        "yes",
    ]
    assert rows[2]["extra_info"]["answer_type"] == "CLOSED" and rows[0]["images"][0]["path"] == "val/val_0000.jpg"


def test_benchmark_names_are_protocol_datasets():
    for mod in (pmc_vqa, omnimedvqa, mmmu_med, medxpertqa_mm):
        assert mod.DATASET in DATASETS
