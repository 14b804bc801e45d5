"""``vitos.unparsed_box``: what the reasoning stream sees, and what the grounding sample earns, when
a grounding output holds no box on the image (none, unparseable, off the image)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from vitos_verl.pruning import KeepMask, image_geometry
from vitos_verl.pruning.plan import UNPARSED_BOX_RULES, reasoning_input
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.dual_stream import plan_reasoning

ROOT = Path(__file__).resolve().parents[1]
NO_BOX = ("I cannot tell", "<box>[2000, 2000, 2100, 2100]</box>", "<box>[1, 2, 3]</box>", "<box>" + " " * 500)


@pytest.mark.parametrize("min_keep_ratio", [0.0, 0.1, 0.3])
def test_keep_min_keeps_the_fewest_cells_at_the_centre(min_keep_ratio):
    geom = image_geometry(640, 480)
    rows, cols = geom.cell_grid
    image = Image.new("RGB", geom.orig_size)
    ri = reasoning_input("tokens", image, geom, None, margin_cells=2, min_keep_ratio=min_keep_ratio, unparsed_box="keep_min")
    want = max(1, math.ceil(min_keep_ratio * rows * cols - 1e-9))
    assert int(ri.keep_mask.cells.sum()) == want and ri.keep_ratio == pytest.approx(want / (rows * cols))
    kept = ri.keep_mask.cells.nonzero().float().mean(0)  # the kept cells sit around the centre cell
    assert abs(kept[0] - (rows - 1) / 2) <= 1 and abs(kept[1] - (cols - 1) / 2) <= 1
    for rule in ("keep_all", "no_feedback"):
        full = reasoning_input("tokens", image, geom, None, 2, min_keep_ratio, unparsed_box=rule)
        assert bool(full.keep_mask.cells.all()) and full.keep_ratio == 1.0
    crop = reasoning_input("crop", image, geom, None, 0, 0.0, unparsed_box="keep_min")
    assert crop.keep_ratio == pytest.approx(1 / (rows * cols)) and crop.image.size[0] < image.size[0] / 10
    with pytest.raises(ValueError, match="unparsed_box"):
        reasoning_input("tokens", image, geom, None, unparsed_box="keep_none")


@pytest.mark.parametrize("rule", UNPARSED_BOX_RULES)
def test_plan_reasoning_follows_the_rule(rule):
    geom = image_geometry(640, 480)
    texts = ["<box>[100, 100, 200, 200]</box>", *NO_BOX]
    n = len(texts)
    cfg = ViToSConfig(n_r=2, margin_cells=1, unparsed_box=rule)
    plan = plan_reasoning(texts, [list(geom.grid_thw)] * n, [geom.orig_size] * n, [[]] * n, cfg)
    assert plan.parsed.tolist() == [True] + [False] * len(NO_BOX)
    box_keep = KeepMask.decode(plan.vitos_keep[0]).cells
    for j in range(2, 2 * n):  # the samples made from the outputs without a box
        if rule == "keep_min":
            assert int(KeepMask.decode(plan.vitos_keep[j]).cells.sum()) == 1 < int(box_keep.sum())
        else:
            assert plan.vitos_keep[j] == "" and plan.keep_ratio[j] == 1.0


def test_config_and_reward_kwargs_carry_the_rule():
    # the default gives a missing box nothing: under keep_all a policy learns to give none
    assert ViToSConfig().unparsed_box == "no_feedback"
    cfg = OmegaConf.load(ROOT / "vitos_verl" / "trainer" / "conf" / "vitos_trainer.yaml")
    assert cfg.vitos.unparsed_box == ViToSConfig().unparsed_box  # one default in yaml and dataclass
    assert ViToSConfig(unparsed_box="no_feedback").reward_kwargs(3136, 200704)["unparsed_box"] == "no_feedback"
    with pytest.raises(ValueError, match="vitos.unparsed_box"):
        ViToSConfig(unparsed_box="keep_none")
