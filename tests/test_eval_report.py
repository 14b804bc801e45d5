"""vitos_verl.eval.report: tables, relative performance, plots and cards from prediction JSONL.

The predictions are written here by hand (two methods plus a one-benchmark baseline, two
benchmarks) so every number below is computed by hand: model ``M``,

=========  ============  ================  ===============  ===============
method     SLAKE (n=10)  VQA-RAD (n=5)     time SLAKE/RAD   keep ratio
=========  ============  ================  ===============  ===============
full       40 % (4/10)   100 % (5/5)       2.0 / 3.0 s      1.0
vitos      50 % (5/10)   80 % (4/5)        1.0 / 1.0 s      the real mask's
random     30 % (3/10)   -                 1.0 s            0.5
=========  ============  ================  ===============  ===============

ViToS against one pass: mean of ratios (50/40 + 80/100) / 2 = 102.5 %, ratio of means
65 / 70 = 92.857 %; speed-up 2.0 on SLAKE, 3.0 on VQA-RAD, 2.5 on average (2.5 s / 1.0 s).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitos_verl.data.schema import make_row
from vitos_verl.eval import report
from vitos_verl.pruning import KeepMask, box_to_keep_mask, box_to_resized, image_geometry, keep_ratio

ROOT = Path(__file__).resolve().parents[1]
REAL_SLAKE = ROOT / "outputs" / "data" / "slake" / "test.parquet"
SCRIPT = "<script>alert(1)</script>"


def _slake_rows() -> list[dict]:
    """Three SLAKE test rows with boxes: the prepared real ones if present, else synthetic rows."""
    if REAL_SLAKE.exists():
        rows = [r for r in pq.read_table(REAL_SLAKE).to_pylist() if r["extra_info"]["gt_boxes"]][:3]
        if len(rows) == 3:
            return rows
    out = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("L", (300, 240), 40 + 60 * i).save(buf, format="PNG")
        out.append(make_row(data_source="slake", split="test", index=i, question=f"Where is finding {i}?",
                            answer="Lung", image_bytes=buf.getvalue(), image_path=f"xmlab{i}/source.png",
                            image_size=(300, 240), gt_boxes=[[50.0 + i, 60.0, 120.0, 150.0]], box_rule="all"))
    return out


def _record(model, benchmark, method, i, right, strict, time_s, row=None, keep=1.0, mask=None, box_r=None,
            box_o=None, prediction="yes"):
    ex = row["extra_info"] if row else {"question": f"Is there a finding {i}?", "answer": "yes",
                                        "image_size": [100, 100], "gt_boxes": []}
    return {
        "model": model, "benchmark": benchmark, "method": method, "uid": f"{benchmark}-{i}", "index": i % 3,
        "question": ex["question"], "answer": ex["answer"], "answer_type": "OPEN", "choices": None,
        "image_path": "", "image_size": ex["image_size"], "prediction": prediction,
        "grounding_output": None if method == "full" else "<box>[1, 2, 3, 4]</box>",
        "box_resized": box_r, "box_original": box_o, "gt_boxes": ex["gt_boxes"], "iou": None if box_o is None else 0.5,
        "keep_mask": mask, "keep_ratio": keep, "visual_tokens": 100, "kept_tokens": round(100 * keep),
        "prompt_tokens": 120 if method == "full" else 60, "grounding_prompt_tokens": 0 if method == "full" else 130,
        "output_tokens": 20, "time_s": time_s, "correct": {"medevalkit": right, "strict": strict},
    }


def _write(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    rows = _slake_rows()
    (root / "data" / "slake").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "slake" / "test.parquet")
    pred = root / "predictions" / "M"
    full, vitos, rand = [], [], []
    for i in range(10):
        row = rows[i % 3]
        ex = row["extra_info"]
        geom = image_geometry(*ex["image_size"])
        box_r = box_to_resized(ex["gt_boxes"][0], geom)
        mask = box_to_keep_mask(box_r, geom.cell_grid, margin_cells=1)
        pred_text = SCRIPT if i == 0 else "yes"
        full.append(_record("M", "slake", "full", i, i < 4, i < 4, 2.0, row, prediction=pred_text))
        vitos.append(_record("M", "slake", "vitos", i, i < 5, i < 6, 1.0, row, keep=keep_ratio(mask),
                             mask=KeepMask(mask).encode(), box_r=box_r, box_o=ex["gt_boxes"][0], prediction=pred_text))
        rand.append(_record("M", "slake", "random", i, i < 3, i < 3, 1.0, row, keep=0.5))
    _write(pred / "slake" / "full.jsonl", full, ("{not json", "", "[1, 2]", json.dumps(full[1])))
    _write(pred / "slake" / "vitos.jsonl", vitos)
    _write(pred / "slake" / "random.jsonl", rand)
    _write(pred / "vqa_rad" / "full.jsonl", [_record("M", "vqa_rad", "full", i, True, True, 3.0) for i in range(5)])
    rad = [_record("M", "vqa_rad", "vitos", i, i < 4, i < 4, 1.0, keep=0.25) for i in range(5)]
    rad[4]["error"] = "answer: prompt too long"
    _write(pred / "vqa_rad" / "vitos.shard0of2.jsonl", rad[0::2])  # the runner's shards: merged
    _write(pred / "vqa_rad" / "vitos.shard1of2.jsonl", rad[1::2])
    (pred / "slake" / "load_report.json").write_text(
        json.dumps({"parquet": str(root / "data" / "slake" / "test.parquet"), "evaluated": 10}))
    (pred / "vqa_rad" / "load_report.json").write_text(
        json.dumps({"rows_in": 7, "rows_out": 5, "skipped": {"missing_image": 2}}))
    return root


@pytest.fixture(scope="module")
def written(eval_root, tmp_path_factory) -> dict[str, Path]:
    return report.write_report(eval_root, tmp_path_factory.mktemp("report"), cards=200)


def _row(summary, method, model="M"):
    return next(r for r in summary["rows"] if r["model"] == model and r["method"] == method)


def test_load_counts_bad_lines_and_duplicates(eval_root):
    records = report.load_predictions(eval_root)
    rep = records.report
    assert rep["files"] == 6 and rep["bad_lines"] == 2 and rep["duplicates"] == 1 and rep["path_mismatch"] == 0
    assert len(records) == rep["records"] == 10 + 10 + 10 + 5 + 5
    assert {b["line"] for b in rep["bad"]} == {11, 13}  # "{not json" and "[1, 2]"; blank line 12 ignored
    assert rep["load_reports"]["M/vqa_rad"] == {"rows_in": 7, "rows_out": 5, "skipped": {"missing_image": 2}}
    assert {r["method"] for r in records if r["benchmark"] == "vqa_rad"} == {"full", "vitos"}


def test_accuracy_speedup_relative_hand_computed(eval_root):
    summary = report.summarize(report.load_predictions(eval_root))
    assert summary["benchmarks"] == ["slake", "vqa_rad"]
    assert [(r["method"], r["model"]) for r in summary["rows"]] == [("full", "M"), ("vitos", "M"), ("random", "M")]
    vitos = _row(summary, "vitos")
    slake, rad = vitos["per_benchmark"]["slake"], vitos["per_benchmark"]["vqa_rad"]
    assert (slake["n"], rad["n"]) == (10, 5)
    assert slake["accuracy"] == {"medevalkit": 50.0, "strict": 60.0}
    assert rad["accuracy"] == {"medevalkit": 80.0, "strict": 80.0}
    assert slake["time_per_question_s"] == 1.0 and slake["speedup"] == 2.0 and rad["speedup"] == 3.0
    assert slake["prompt_tokens"] == 60 and slake["grounding_prompt_tokens"] == 130
    assert rad["n_errors"] == 1 and slake["n_errors"] == 0
    avg = vitos["average"]
    assert avg["accuracy"]["medevalkit"] == pytest.approx(65.0)
    assert avg["speedup"] == pytest.approx(2.5)
    rel = vitos["relative"]["medevalkit"]
    assert rel["mean_of_ratios"] == pytest.approx(102.5)
    assert rel["ratio_of_means"] == pytest.approx(100 * 65 / 70)  # 92.857
    assert rel["benchmarks"] == ["slake", "vqa_rad"] and rel["against"] == "M / full"
    # strict: (60/40 + 80/100) / 2 = 115 %; 70 / 70 = 100 %
    assert vitos["relative"]["strict"]["mean_of_ratios"] == pytest.approx(115.0)
    assert vitos["relative"]["strict"]["ratio_of_means"] == pytest.approx(100.0)
    # the one-benchmark baseline: only SLAKE is shared, 30 / 40
    rnd = _row(summary, "random")["relative"]["medevalkit"]
    assert rnd["benchmarks"] == ["slake"] and rnd["mean_of_ratios"] == pytest.approx(75.0)
    assert rnd["ratio_of_means"] == pytest.approx(75.0)
    assert _row(summary, "full")["relative"]["medevalkit"]["mean_of_ratios"] == pytest.approx(100.0)
    assert _row(summary, "full")["average"]["speedup"] == pytest.approx(1.0)


def test_reference_published_and_method(eval_root):
    records = report.load_predictions(eval_root)
    pub = _row(report.summarize(records, "published:Lingshu-7B"), "vitos")["relative"]
    l7 = report.PUBLISHED["Lingshu-7B"]
    assert pub["medevalkit"]["mean_of_ratios"] == pytest.approx(100 * (50 / l7["slake"] + 80 / l7["vqa_rad"]) / 2)
    assert pub["medevalkit"]["ratio_of_means"] == pytest.approx(100 * 65 / ((l7["slake"] + l7["vqa_rad"]) / 2))
    assert pub["strict"]["mean_of_ratios"] is None  # published scores are MedEvalKit only
    other = report.summarize(records, "M:vitos")
    assert _row(other, "vitos")["relative"]["strict"]["ratio_of_means"] == pytest.approx(100.0)
    # full against vitos: (40/50 + 100/80) / 2 = 102.5 %, 70 / 65
    full = _row(other, "full")["relative"]["medevalkit"]
    assert full["mean_of_ratios"] == pytest.approx(102.5) and full["ratio_of_means"] == pytest.approx(700 / 6.5)
    with pytest.raises(ValueError):
        report.summarize(records, "published:nobody")


def test_markdown_table_layout(eval_root):
    summary = report.summarize(report.load_predictions(eval_root))
    table = report.markdown_table(summary, "medevalkit")
    head, _sep, *body = table.splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[2:9] == ["SLAKE", "VQA-RAD", "PathVQA", "PMC-VQA", "OmniMedVQA", "MMMU-Med", "MedXpertQA-MM"]
    vitos = dict(zip(cols, (c.strip() for c in body[1].strip("|").split("|"))))
    assert vitos["Backbone"] == "M" and vitos["SLAKE"] == "50.0" and vitos["VQA-RAD"] == "80.0"
    assert vitos["PathVQA"] == "-" and vitos["MedXpertQA-MM"] == "-"
    assert vitos["Avg."] == "65.0"
    assert vitos["Rel. (mean of ratios)"] == "102.5%" and vitos["Rel. (ratio of means)"] == "92.9%"
    assert vitos["Speed-up"] == "2.50x" and vitos["Latency (s/q)"] == "1.000"
    assert vitos["Prompt tok."] == "60" and vitos["Ground. prompt tok."] == "130"
    rnd = dict(zip(cols, (c.strip() for c in body[2].strip("|").split("|"))))
    assert rnd["VQA-RAD"] == "-" and rnd["Avg."] == "30.0*"  # fewer benchmarks than the table
    assert rnd["Keep ratio"] == "0.500"


def test_write_report_files(written):
    md = written["report.md"].read_text()
    assert "## Protocol: medevalkit" in md and "## Protocol: strict" in md
    assert "malformed lines skipped: 2" in md and "skipped.missing_image = 2" in md
    assert "vitos / M / vqa_rad: 1 records with an error" in md
    assert "| vitos | M | 10 | 5 | 15 |" in md  # n per cell
    summary = json.loads(written["report.json"].read_text())
    assert _row(summary, "vitos")["relative"]["medevalkit"]["ratio_of_means"] == pytest.approx(100 * 65 / 70)
    for name in ("accuracy_vs_keep.png", "time_vs_keep.png"):
        with Image.open(written[name]) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_cards_html(written):
    page = written["cards.html"].read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    cards = re.findall(r'<div class="card (?:wrong|right)" data-uid="([^"]+)"', page)
    assert len(cards) == len(set(cards)) == 15  # one per question: 10 SLAKE + 5 VQA-RAD
    assert page.index('id="slake"') < page.index('id="vqa_rad"')
    # wrong verdicts over methods and protocols: 6 each for 6-9, then 5 (q5), 4, 2, and 0 for 0-2;
    # ties by parquet row index (uid i is row i % 3), then uid
    assert cards[:10] == [f"slake-{i}" for i in (6, 9, 7, 8, 5, 4, 3, 0, 1, 2)]
    assert "0 left out" in page
    imgs = re.findall(r'<img src="(img/[^"]+)"', page)
    assert imgs and all((written["cards.html"].parent / p).exists() for p in imgs)
    for p in set(imgs):
        with Image.open(written["cards.html"].parent / p) as im:
            assert im.format == "PNG" and max(im.size) <= report.THUMB
    assert "error: answer: prompt too long" in page
    assert "vqa_rad: row or parquet not found: 3" in page  # no VQA-RAD parquet (3 distinct rows): noted


def test_cli_caps_cards(eval_root, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(eval_root), "--out", str(out), "--reference", "published:Lingshu-7B", "--cards", "3"]) == 0
    page = (out / "cards.html").read_text()
    assert len(re.findall(r'<div class="card ', page)) == 3 and "12 left out" in page
    assert "published medevalkit scores of Lingshu-7B" in (out / "report.md").read_text()
    assert "report.md:" in capsys.readouterr().out


def test_each_pass_components_hand_computed():
    """The speed table's components: per pass output tokens, seconds per question, batch and the
    answering pass's throughput, from records as the runner writes them."""
    from vitos_verl.eval.report_markdown import passes_table
    from vitos_verl.eval.report_summary import summarize

    def rec(method, i, g_out, a_out, g_t, a_t):
        r = _record("M", "slake", method, i, True, True, g_t + a_t)
        r.update(grounding_output_tokens=g_out, answer_output_tokens=a_out, output_tokens=g_out + a_out,
                 grounding_time_s=g_t, answer_time_s=a_t, answer_batch=2, grounding_batch=2 if g_out else 0)
        return r

    records = [rec("full", 0, 0, 30, 0.0, 0.5), rec("full", 1, 0, 10, 0.0, 0.5),
               rec("vitos", 0, 12, 8, 0.2, 0.1), rec("vitos", 1, 14, 8, 0.2, 0.3)]  # fmt: skip
    s = summarize(records)
    full, vitos = _row(s, "full")["average"], _row(s, "vitos")["average"]
    assert full["answer_output_tokens"] == 20 and full["answer_time_s"] == 0.5
    assert full["answer_questions_per_s"] == pytest.approx(2.0) and full["answer_tokens_per_s"] == pytest.approx(40.0)
    assert vitos["grounding_output_tokens"] == 13 and vitos["grounding_time_s"] == pytest.approx(0.2)
    assert vitos["answer_tokens_per_s"] == pytest.approx(16 / 0.4) and vitos["answer_batch"] == 2
    lines = passes_table(s).splitlines()
    one = next(line for line in lines if line.startswith("| One pass"))
    two = next(line for line in lines if line.startswith("| ViToS"))
    assert one.split(" | ")[2:6] == ["-", "-", "-", "-"]  # no grounding pass
    assert two.split(" | ")[2:6] == ["130", "13.0", "0.2000", "2"]
    assert two.split(" | ")[-5:-1] == ["0.2000", "2", "5.0", "40"]
