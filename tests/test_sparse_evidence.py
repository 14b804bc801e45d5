"""The controlled sparse-evidence task (data_prep.sparse_evidence): seeded, balanced, in the row
schema of the real converters, evidence visible only inside its box, and taken unchanged by the
SFT builder, the keep-mask planner and the rewards."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import sparse_evidence as se
from data_prep.common import SCHEMA
from vitos_verl.data.sft import sft_rows
from vitos_verl.pruning import KeepMask, image_geometry
from vitos_verl.rewards.score import compute_score


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("se")
    summary = se.main(["--out", str(out), "--seed", "3", "--n-train", "64", "--n-val", "32"])
    return out, summary


def _rows(path):
    return pq.read_table(path).to_pylist()


def _image(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"), dtype=np.int16)


def test_schema_balance_and_seed(task, tmp_path):
    out, summary = task
    train = pq.read_table(out / "train.parquet")
    assert train.schema.equals(SCHEMA)
    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for split, n in (("train", 64), ("val", 32)):
        part = s["splits"][split]
        assert part["rows_out"] == n
        assert sorted(part["answers"].values()) == [n // 4] * 4, part["answers"]  # balanced answers
        assert sorted(part["regions"].values()) == [n // 4] * 4, part["regions"]  # and evidence regions
    assert s["val_images_in_train"] == 0
    # the same arguments write the same bytes; another seed does not
    again = se.main(["--out", str(tmp_path / "a"), "--seed", "3", "--n-train", "64", "--n-val", "32"])
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (out / "train.parquet").read_bytes()
    assert again["splits"]["train"]["answers"] == summary["splits"]["train"]["answers"]
    se.main(["--out", str(tmp_path / "b"), "--seed", "4", "--n-train", "64", "--n-val", "32"])
    assert (tmp_path / "b" / "train.parquet").read_bytes() != (out / "train.parquet").read_bytes()


def test_answer_is_visible_only_inside_the_evidence(task):
    """Every colour of the palette used is on the full image; inside the evidence box (dilated by
    one cell, as the planner keeps it) only the answer's colour is."""
    out, _ = task
    spec = se.TaskSpec()
    for row in _rows(out / "val.parquet"):
        px = _image(row)
        answer = row["reward_model"]["ground_truth"]
        x1, y1, x2, y2 = (int(v) for v in row["extra_info"]["gt_boxes"][0])
        mask = KeepMask.from_box([x1, y1, x2, y2], (8, 8), margin_cells=1)
        keep = np.kron(mask.cells.numpy(), np.ones((28, 28), dtype=bool))

        def colours(region: np.ndarray) -> set[str]:
            return {
                name for name, rgb in se.PALETTE.items()
                if (np.abs(region - np.array(rgb)).max(-1) < 40).sum() > 200
            }

        assert colours(px.reshape(-1, 3)) == set(spec.colours)
        assert colours(px[keep]) == {answer}
        assert row["extra_info"]["answer_type"] == "CLOSED" and row["data_source"] == "sparse_evidence"
        assert row["extra_info"]["image_size"] == [224, 224]


def test_rewards_and_sft_take_the_rows_unchanged(task):
    out, _ = task
    row = _rows(out / "train.parquet")[0]
    info, gt = row["extra_info"], row["reward_model"]["ground_truth"]
    # the SFT builder's grounding target is the evidence region; the whole-image box scores chance IoU
    sft = sft_rows([row], 3136, 50176, skipped=__import__("collections").Counter())
    target = sft[0]["messages"][-1]["content"]
    kw = dict(w_iou=1.0, w_fb=0.0, w_fmt=0.0, min_pixels=3136, max_pixels=50176)
    extra = {**info, "stream": "grounding"}
    assert compute_score("sparse_evidence", target, gt, extra, **kw)["iou"] == 1.0
    whole = compute_score("sparse_evidence", "<box>[0, 0, 224, 224]</box>", gt, extra, **kw)["iou"]
    assert whole == pytest.approx(0.25)
    r = compute_score("sparse_evidence", f"<think>x</think><answer>{gt}</answer>", gt, {**info, "stream": "reasoning"})
    assert r["acc"] == 1.0
    assert image_geometry(224, 224, 3136, 50176).grid_thw == (1, 16, 16)  # 14-px patches: 8 x 8 cells of 28 px


def test_bad_specs_are_refused(tmp_path):
    for bad in (dict(size=230), dict(n_colours=1), dict(object_cells=3), dict(noise=-1), dict(outline=21)):
        with pytest.raises(ValueError):
            se.generate(tmp_path, 0, 4, 4, se.TaskSpec(**bad))
    with pytest.raises(ValueError):
        se.generate(tmp_path, 0, 0, 4)
    assert not (tmp_path / "train.parquet").exists()


def test_format_only_warm_start_draws_targets_from_other_rows(task):
    """``vitos_verl.data.sft --random-targets``: the templates' format with boxes and answers of
    other rows, so the warm-started policy knows the format and the answer set, not the task."""
    from collections import Counter

    from vitos_verl.data.sft import RandomTargets
    from vitos_verl.pruning.boxes import best_iou, parse_boxes

    out, _ = task
    rows = _rows(out / "train.parquet")
    sft = sft_rows(rows, 3136, 50176, Counter(), RandomTargets(rows, seed=1))
    again = sft_rows(rows, 3136, 50176, Counter(), RandomTargets(rows, seed=1))
    assert [r["messages"][-1] for r in sft] == [r["messages"][-1] for r in again]  # seeded
    g = [(r, row) for r, row in zip(sft[0::2], rows)]
    ious = [best_iou(parse_boxes(r["messages"][-1]["content"])[0], row["extra_info"]["gt_boxes"]) for r, row in g]
    assert set(ious) == {0.0, 1.0} and 0.1 < sum(ious) / len(ious) < 0.5  # quadrant boxes, right by chance only
    answers = [r["messages"][-1]["content"] for r in sft[1::2]]
    truth = [row["reward_model"]["ground_truth"] for row in rows]
    assert all(a.endswith(f"<answer>{c}</answer>") for a, c in zip(answers, truth)) is False
    assert {a.split("<answer>")[1][:-9] for a in answers} <= set(se.TaskSpec().colours)
    right = sum(a.endswith(f"<answer>{c}</answer>") for a, c in zip(answers, truth)) / len(rows)
    assert right < 0.5


def test_position_cue_shades_every_pixel_by_where_it_is():
    """``position_cue`` adds a bias field over the whole image, objects included (red rises left to
    right, blue top to bottom, by at most the cue), so a disc's own pixels tell its quadrant; the
    same disc drawn in another quadrant differs only by the field. ``distractor_cells`` draws the
    squares smaller than the disc. Without the options the image is the plain one."""
    plain, cued = se.TaskSpec(noise=0.0), se.TaskSpec(noise=0.0, position_cue=120.0)
    colours = ["red", None, None, None]
    a = np.asarray(se.draw(plain, 0, colours, np.random.default_rng(0)), dtype=np.int16)
    b = np.asarray(se.draw(cued, 0, colours, np.random.default_rng(0)), dtype=np.int16)
    field = b - a
    assert field[..., 1].max() == 0  # green untouched
    assert field[0, 0].tolist() == [0, 0, 0] and field[-1, -1].tolist() == [120, 0, 120]
    assert (np.diff(field[..., 0], axis=1) >= 0).all() and (np.diff(field[..., 2], axis=0) >= 0).all()
    disc = (a != np.asarray(se.BACKGROUND)).any(-1)
    assert disc.sum() > 500 and (field[disc][:, 0] > 0).all()  # the disc is shaded too
    # the same disc in the top-left and bottom-right quadrant: different pixels once cued
    br = np.asarray(se.draw(cued, 3, [None, None, None, "red"], np.random.default_rng(0)), dtype=np.int16)
    br_plain = np.asarray(se.draw(plain, 3, [None, None, None, "red"], np.random.default_rng(0)), dtype=np.int16)
    br_disc = (br_plain != np.asarray(se.BACKGROUND)).any(-1)
    assert br[br_disc][:, 2].mean() > b[disc][:, 2].mean() + 60  # its blue channel says "bottom"
    with pytest.raises(ValueError, match="position_cue"):
        se.TaskSpec(position_cue=300).check()
    # squares of 1 cell beside a disc of 2
    small = se.TaskSpec(noise=0.0, object_cells=2.0, distractor_cells=1.0)
    img = np.asarray(se.draw(small, 0, ["red", "green", "blue", "yellow"], np.random.default_rng(0)), dtype=np.int16)
    sizes = {c: int((np.abs(img - np.asarray(se.PALETTE[c])).sum(-1) == 0).sum()) for c in ("red", "green")}
    assert sizes["green"] == 28 * 28 and sizes["red"] > 2 * 28 * 28, sizes
    with pytest.raises(ValueError, match="distractor_cells"):
        se.TaskSpec(distractor_cells=3.0).check()
