"""Data prep on damaged copies of the real data: every row accounted for, whole-file problems
stop the run before anything is written, the summary always describes the parquet beside it.

Each test builds a small copy in pytest's tmp_path: a handful of real records and real images
(symlinked; a damaged image is derived from a real one), with one bad record of each kind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import pathvqa, slake, vqa_rad
from data_prep.common import SKIP_REASONS, SkipRow, SourceFileError, check_image_bytes, check_image_size

ROOT = Path(__file__).resolve().parents[1]


def _accounted(s: dict) -> None:
    assert s["rows_in"] == s["rows_out"] + sum(s["skipped"].values()) + sum(s["filtered"].values())
    assert set(s["skipped"]) <= set(SKIP_REASONS)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reshaped(real: Path, size: tuple[int, int]) -> bytes:
    """A real image resized to ``size`` (W, H), JPEG bytes."""
    buf = io.BytesIO()
    Image.open(real).convert("L").resize(size).save(buf, "JPEG")
    return buf.getvalue()


# --- SLAKE -----------------------------------------------------------------------------------


def _slake_records(slake_dir: Path) -> dict[int, dict]:
    return {r["qid"]: r for r in json.loads((slake_dir / "test.json").read_text()) if r["q_lang"] == "en"}


@pytest.fixture
def slake_damaged(slake_dir, tmp_path) -> tuple[Path, list[dict]]:
    """A SLAKE release copy whose test.json holds one bad record of each kind."""
    src = tmp_path / "slake"
    imgs = src / "imgs"
    imgs.mkdir(parents=True)
    for n in ("xmlab102", "xmlab18", "xmlab405"):
        (imgs / n).symlink_to(slake_dir / "imgs" / n, target_is_directory=True)
    real = slake_dir / "imgs" / "xmlab18" / "source.jpg"
    # NaN coordinate in one box of an otherwise good detection.json
    (imgs / "nanbox").mkdir()
    (imgs / "nanbox" / "source.jpg").symlink_to(real)
    det = json.loads((slake_dir / "imgs" / "xmlab18" / "detection.json").read_text())
    det = [{k: ([math.nan, *v[1:]] if k == "Liver" else v) for k, v in d.items()} for d in det]
    (imgs / "nanbox" / "detection.json").write_text(json.dumps(det))  # writes the NaN token
    # truncated detection.json
    (imgs / "truncdet").mkdir()
    (imgs / "truncdet" / "source.jpg").symlink_to(real)
    (imgs / "truncdet" / "detection.json").write_text('[{"Liver": [1, 2, 3')
    # a 3000x10 image (Qwen's processor refuses aspect ratios over 200), a corrupt one
    (imgs / "wide").mkdir()
    (imgs / "wide" / "source.jpg").write_bytes(_reshaped(real, (3000, 10)))
    (imgs / "wide" / "detection.json").write_text("[]")
    (imgs / "corrupt").mkdir()
    (imgs / "corrupt" / "source.jpg").write_bytes(real.read_bytes()[:2000])

    real_recs = _slake_records(slake_dir)
    good = [real_recs[q] for q in (11934, 11941, 11937, 12058, 12062, 12064)]  # xmlab102 x3, xmlab18 x3

    def bad(qid: int, **kw) -> dict:
        return {**real_recs[12062], "qid": qid, **kw}  # "Does the picture contain spleen?" on xmlab18

    recs = [
        *good,
        bad(90001, img_name=None),
        bad(90002, img_name=18),
        bad(90003, img_name="xmlab18"),  # a directory
        bad(90004, img_name="../slake/imgs/xmlab18/source.jpg"),
        bad(90005, answer=None),
        bad(90006, answer=True),
        bad(90007, answer=["a", "b"]),
        bad(90008, question=None),
        bad(90009, answer="  "),
        bad(90010, img_name="xmlab999/source.jpg"),
        bad(90011, img_name="corrupt/source.jpg"),
        bad(90012, img_name="wide/source.jpg"),
        bad(90013, img_name="truncdet/source.jpg"),
        # NaN box: skipped where the row needs the Liver box, kept where it does not
        bad(90014, img_name="nanbox/source.jpg", question="Does the picture contain liver?"),
        bad(90015, img_name="nanbox/source.jpg"),
        {"question": "no image name", "answer": "x", "q_lang": "en"},
        "not a record",
        {**real_recs[11941]},  # duplicate qid: written once
        {**real_recs[11941], "question": "What diseases are shown?"},  # same qid, other content
        real_recs[12549] | {"q_lang": "zh"},  # filtered, not skipped
    ]
    (src / "test.json").write_text(json.dumps(recs))
    (src / "train.json").write_text(json.dumps(good[:2]))
    return src, recs


def test_slake_every_bad_record_has_a_reason(slake_damaged, tmp_path):
    src, recs = slake_damaged
    out = tmp_path / "out"
    s = slake.main(["--src", str(src), "--out", str(out), "--splits", "test"])["splits"]["test"]
    _accounted(s)
    assert s["rows_in"] == len(recs) == 26
    assert s["skipped"] == {
        "bad_box": 1,
        "bad_image_name": 3,
        "corrupt_image": 1,
        "duplicate_qid": 2,
        "empty_question_or_answer": 1,
        "image_not_a_file": 1,
        "bad_aspect_ratio": 1,
        "malformed_detection": 1,
        "malformed_record": 2,
        "missing_image": 1,
        "non_string_answer": 3,
        "non_string_question": 1,
    }
    assert s["filtered"] == {"lang_zh": 1}
    assert s["rows_out"] == 7
    assert s["duplicate_ids"] == ["11941", "11941"]
    assert s["notes"]["detection_bad_entries"] == 1
    assert "3000x10" in s["skip_examples"]["bad_aspect_ratio"]
    rows = pq.read_table(out / "test.parquet").to_pylist()
    info = {r["extra_info"]["record_id"]: r["extra_info"] for r in rows}
    assert sorted(info) == sorted(["11934", "11941", "11937", "12058", "12062", "12064", "90015"])
    # no answer was stringified; the duplicate kept its first content
    assert {i["answer"] for i in info.values()} <= {str(r["answer"]) for r in recs[:6]}
    assert info["11941"]["question"] == "What diseases are included in the picture?"
    # the good box of the NaN file is used; the NaN one is never written
    assert info["90015"]["box_labels"] == ["Spleen"]
    assert all(math.isfinite(v) for i in info.values() for b in i["gt_boxes"] for v in b)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["test"]["sha256"] == _sha(out / "test.parquet")
    assert summary["splits"]["test"]["box_rules"] == {"named": 5, "none": 2, "all": 0}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'[{"img_name": "xmlab102/source.jpg", "question": "q", "ans', "not valid JSON"),
        (b'[{"question": "\xe9t\xe9", "answer": "x"}]', "not UTF-8"),
        (json.dumps({"data": [{"question": "q", "answer": "a"}]}).encode(), "top level is an object"),
        (b"", "not valid JSON"),
    ],
    ids=["truncated", "latin1", "wrapped-in-object", "empty"],
)
def test_slake_bad_split_file_stops_before_writing(slake_damaged, tmp_path, content, match):
    src, _ = slake_damaged
    out = tmp_path / "out"
    (src / "test.json").write_bytes(content)
    with pytest.raises(SourceFileError, match=match) as e:
        slake.main(["--src", str(src), "--out", str(out), "--splits", "train,test"])
    assert str(src / "test.json") in str(e.value)
    assert not out.exists()  # train (good, asked first) was not written either


def test_slake_missing_split_file_checked_up_front(slake_damaged, tmp_path):
    src, _ = slake_damaged
    out = tmp_path / "out"
    with pytest.raises(SourceFileError, match="validate.json: split file missing"):
        slake.main(["--src", str(src), "--out", str(out), "--splits", "train,test,val"])
    assert not out.exists()


def test_cli_names_the_file_and_exits_2(slake_damaged, tmp_path):
    src, _ = slake_damaged
    (src / "test.json").write_text("[{")
    p = subprocess.run(
        [sys.executable, "-m", "data_prep.slake", "--src", str(src), "--out", str(tmp_path / "o"), "--splits", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and str(src / "test.json") in p.stderr and "Traceback" not in p.stderr


def test_crashed_rerun_leaves_a_consistent_summary(slake_damaged, tmp_path, monkeypatch):
    """A run that crashes mid-way leaves the previous parquet and summary together, no temp files."""
    src, _ = slake_damaged
    out = tmp_path / "out"
    slake.main(["--src", str(src), "--out", str(out), "--splits", "train,test"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.parquet", "test.parquet", "summary.json"}

    calls = {"n": 0}
    real_make_row = slake.make_row

    def crashing_make_row(**kw):
        calls["n"] += 1
        if calls["n"] > 3:  # train written to its temp file, test half way
            raise RuntimeError("killed")
        return real_make_row(**kw)

    monkeypatch.setattr(slake, "make_row", crashing_make_row)
    with pytest.raises(RuntimeError, match="killed"):
        slake.main(["--src", str(src), "--out", str(out), "--splits", "train,test", "--box-rule", "legacy"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    summary = json.loads((out / "summary.json").read_text())
    for split in ("train", "test"):
        assert summary["splits"][split]["sha256"] == _sha(out / f"{split}.parquet")


def test_rerun_replaces_summary_with_the_new_one(slake_damaged, tmp_path):
    src, _ = slake_damaged
    out = tmp_path / "out"
    slake.main(["--src", str(src), "--out", str(out), "--splits", "test"])
    slake.main(["--src", str(src), "--out", str(out), "--splits", "test", "--box-rule", "legacy", "--limit", "3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["box_rule"] == "legacy"
    assert summary["splits"]["test"]["rows_out"] == pq.ParquetFile(out / "test.parquet").metadata.num_rows == 3
    assert summary["splits"]["test"]["sha256"] == _sha(out / "test.parquet")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_decompression_bomb_limit(slake_dir, tmp_path, monkeypatch):
    """Images over Pillow's pixel limit are skipped by name (a real 512x512 slice, limit lowered)."""
    data = (slake_dir / "imgs" / "xmlab102" / "source.jpg").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 - 1)  # Pillow warns above, errors above 2x
    with pytest.raises(SkipRow) as e:
        check_image_bytes(data)
    assert e.value.reason == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 // 3)  # Image.open itself raises
    with pytest.raises(SkipRow) as e:
        check_image_bytes(data)
    assert e.value.reason == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512)
    assert check_image_bytes(data).size == (512, 512)


def test_aspect_ratio_is_the_processors_rule():
    check_image_size((2000, 10))  # 200: allowed by transformers' smart_resize
    for size in ((2010, 10), (10, 3000)):
        with pytest.raises(SkipRow) as e:
            check_image_size(size)
        assert e.value.reason == "bad_aspect_ratio"


# --- VQA-RAD ---------------------------------------------------------------------------------


@pytest.fixture
def vqa_rad_damaged(vqa_rad_dir, tmp_path) -> tuple[Path, list[dict]]:
    src = tmp_path / "vqa_rad"
    (src / "images").mkdir(parents=True)
    train = json.loads((vqa_rad_dir / "trainset.json").read_text())
    good = [r for r in json.loads((vqa_rad_dir / "testset.json").read_text())[:6]]
    int_answer = next(r for r in train if r["qid"] == 2485)  # real: answer 2 (JSON integer)
    for r in [*good, int_answer]:
        link = src / "images" / r["image_name"]
        if not link.exists():
            link.symlink_to(vqa_rad_dir / "images" / r["image_name"])
    real = vqa_rad_dir / "images" / good[0]["image_name"]
    (src / "images" / "wide.jpg").write_bytes(_reshaped(real, (3000, 10)))
    (src / "images" / "adir.jpg").mkdir()

    def bad(qid, **kw):
        return {**good[0], "qid": qid, **kw}

    recs = [
        *good,
        int_answer,
        bad(90001, image_name=None),
        bad(90002, image_name=7),
        bad(90003, image_name="adir.jpg"),
        bad(90004, answer=None),
        bad(90005, answer=True),
        bad(90006, answer=["a", "b"]),
        bad(90007, answer=1.5),
        bad(90008, image_name="wide.jpg"),
        bad(90009, image_name="synpic_missing.jpg"),
        {**good[1]},  # duplicate qid
        bad(90010, phrase_type="frame"),  # filtered
    ]
    (src / "testset.json").write_text(json.dumps(recs))
    (src / "trainset.json").write_text(json.dumps(good[:2]))
    return src, recs


def test_vqa_rad_every_bad_record_has_a_reason(vqa_rad_damaged, tmp_path):
    src, recs = vqa_rad_damaged
    out = tmp_path / "out"
    s = vqa_rad.main(["--src", str(src), "--out", str(out), "--splits", "test"])["splits"]["test"]
    _accounted(s)
    assert s["rows_in"] == len(recs)
    assert s["skipped"] == {
        "bad_aspect_ratio": 1,
        "bad_image_name": 2,
        "duplicate_qid": 1,
        "image_not_a_file": 1,
        "missing_image": 1,
        "non_string_answer": 4,
    }
    assert s["filtered"] == {"phrase_type_frame": 1}
    assert s["rows_out"] == 7 and s["notes"]["answer_int_as_text"] == 1
    rows = pq.read_table(out / "test.parquet").to_pylist()
    answers = {r["extra_info"]["record_id"]: r["reward_model"]["ground_truth"] for r in rows}
    assert answers["2485"] == "2"  # an integer answer is its exact text
    assert not {"None", "True", "['a', 'b']", "1.5"} & set(answers.values())
    assert len(answers) == len(rows)  # each qid once


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"[{", "not valid JSON"), (b'{"data": []}', "top level is an object"), (b"\xff\xfe[]", "not UTF-8")],
)
def test_vqa_rad_bad_split_file(vqa_rad_damaged, tmp_path, content, match):
    src, _ = vqa_rad_damaged
    (src / "testset.json").write_bytes(content)
    with pytest.raises(SourceFileError, match=match):
        vqa_rad.main(["--src", str(src), "--out", str(tmp_path / "out"), "--splits", "train,test"])
    assert not (tmp_path / "out").exists()
    (src / "testset.json").unlink()
    with pytest.raises(SourceFileError, match="testset.json: split file missing"):
        vqa_rad.main(["--src", str(src), "--out", str(tmp_path / "out"), "--splits", "train,test"])
    assert not (tmp_path / "out").exists()


# --- PathVQA ---------------------------------------------------------------------------------


def _hf_rows(vqa_rad_dir: Path, n: int) -> list[dict]:
    recs = json.loads((vqa_rad_dir / "testset.json").read_text())[:n]
    return [
        {
            "image": {"bytes": (vqa_rad_dir / "images" / r["image_name"]).read_bytes(), "path": r["image_name"]},
            "question": r["question"],
            "answer": str(r["answer"]),
            "qid": r["qid"],
        }
        for r in recs
    ]


def test_hf_layout_bad_rows(vqa_rad_dir, tmp_path):
    rows = _hf_rows(vqa_rad_dir, 8)
    real = vqa_rad_dir / "images" / json.loads((vqa_rad_dir / "testset.json").read_text())[0]["image_name"]
    rows[1]["answer"] = None
    rows[2]["image"] = None
    rows[3]["image"] = {"bytes": _reshaped(real, (3000, 10)), "path": "wide.jpg"}
    rows[4]["question"] = None
    rows[5]["qid"] = rows[0]["qid"]
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), src / "test-00000-of-00001.parquet")
    s = pathvqa.main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--splits", "test"])
    t = s["splits"]["test"]
    _accounted(t)
    assert t["skipped"] == {
        "bad_aspect_ratio": 1,
        "duplicate_qid": 1,
        "missing_image": 1,
        "non_string_answer": 1,
        "non_string_question": 1,
    }
    assert t["rows_out"] == 3


def test_hf_layout_bad_files_stop_before_writing(vqa_rad_dir, tmp_path):
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    rows = _hf_rows(vqa_rad_dir, 3)
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    args = ["--src", str(tmp_path / "hf"), "--out", str(out), "--splits", "train,test"]
    with pytest.raises(SourceFileError, match="no parquet for split 'test'"):
        pathvqa.main(args)
    bad = src / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "answer"} for r in rows]), bad)
    with pytest.raises(SourceFileError, match=r"missing \['answer'\]") as e:
        pathvqa.main(args)
    assert str(bad) in str(e.value)
    bad.write_bytes(b"PAR1 truncated")
    with pytest.raises(SourceFileError, match="not a readable parquet"):
        pathvqa.main(args)
    assert not out.exists()


def test_pathvqa_release_bad_records(vqa_rad_dir, tmp_path):
    """LXMERT layout with real images under --images: a bad question, a repeated record."""
    recs = json.loads((vqa_rad_dir / "testset.json").read_text())[:2]
    images = tmp_path / "images" / "val"
    images.mkdir(parents=True)
    for i, r in enumerate(recs):
        (images / f"val_{i:04d}.jpg").symlink_to(vqa_rad_dir / "images" / r["image_name"])
    good = {"img_id": "val_0000", "sentf": {"pvqa": ["q1?", "q2?"]}, "labelf": {"pvqa": [{"yes": 1.0}, {"no": 1.0}]}}
    data = [
        good,
        {"img_id": "val_0001", "sentf": {"pvqa": [None, "ok?"]}, "labelf": {"pvqa": [{"a": 1}, {"b": 1}]}},
        {"img_id": None, "sentf": {"pvqa": ["x?"]}, "labelf": {"pvqa": [{"a": 1}]}},
        {"img_id": "val_0001", "sentf": {"pvqa": ["x?", "y?"]}, "labelf": {"pvqa": [{"a": 1}]}},
        good,  # the same record again
    ]
    src = tmp_path / "pvqa"
    src.mkdir()
    (src / "pvqa_val.json").write_text(json.dumps(data))
    s = pathvqa.main(
        ["--src", str(src), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--splits", "val"]
    )
    v = s["splits"]["val"]
    _accounted(v)
    assert v["rows_in"] == 9 and v["rows_out"] == 3
    assert v["skipped"] == {"duplicate_qid": 2, "malformed_record": 3, "non_string_question": 1}
    (src / "pvqa_val.json").write_text(json.dumps({"val": data}))
    with pytest.raises(SourceFileError, match="pvqa_val.json: top level is an object"):
        pathvqa.main(["--src", str(src), "--out", str(tmp_path / "o2"), "--splits", "val"])


def test_skip_reasons_are_documented():
    with pytest.raises(KeyError, match="undocumented"):
        SkipRow("some_new_reason")
    assert all(isinstance(v, str) and v for v in SKIP_REASONS.values())
