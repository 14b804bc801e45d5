"""Pruning geometry against transformers' Qwen2.5-VL processor and get_rope_index."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vitos_verl.pruning import (
    CELL,
    KeepMask,
    box_to_keep_mask,
    geometry_from_grid,
    image_geometry,
    kept_token_indices,
    mrope_position_ids,
    vision_positions,
)

sizes = st.tuples(st.integers(28, 2000), st.integers(28, 2000)).filter(lambda s: max(s) / min(s) < 150)


@st.composite
def grid_and_box(draw):
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    W, H = cols * CELL, rows * CELL
    x1, x2 = sorted(draw(st.floats(-50, W + 50, allow_nan=False)) for _ in range(2))
    y1, y2 = sorted(draw(st.floats(-50, H + 50, allow_nan=False)) for _ in range(2))
    return (rows, cols), [x1, y1, x2, y2]


@given(sizes)
@settings(max_examples=200, deadline=None)
def test_geometry_matches_processor_formula(size):
    """grid_thw equals (1, H/14, W/14) of the resized image and stays in the pixel budget."""
    W, H = size
    g = image_geometry(W, H, min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    rw, rh = g.resized_size
    assert rw % CELL == 0 and rh % CELL == 0
    assert rw * rh <= 28 * 28 * 256 or (rw == CELL or rh == CELL)
    assert g.grid_thw == (1, rh // 14, rw // 14)
    assert g.num_tokens == (rh // 28) * (rw // 28)


@pytest.mark.parametrize("size", [(512, 512), (240, 240), (1024, 1024), (600, 451), (333, 999)])
def test_grid_equals_tiny_processor(tiny_processor, size):
    """The processor's own image_grid_thw for real-sized images equals the geometry's."""
    ip = tiny_processor.image_processor
    out = ip(images=[Image.new("RGB", size, (40, 80, 120))], return_tensors="pt")
    g = image_geometry(*size, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    assert tuple(out["image_grid_thw"][0].tolist()) == g.grid_thw
    assert out["pixel_values"].shape[0] == g.grid_thw[1] * g.grid_thw[2]


@given(grid_and_box(), st.integers(0, 3), st.floats(0, 1))
@settings(max_examples=300, deadline=None)
def test_keep_mask_properties(gb, margin, ratio):
    (rows, cols), box = gb
    m = box_to_keep_mask(box, (rows, cols), margin, ratio)
    assert m.shape == (rows, cols) and m.dtype == torch.bool
    n = rows * cols
    k = int(m.sum())
    base = box_to_keep_mask(box, (rows, cols), margin, 0.0)
    # never fewer than the ratio, and exactly the ratio when growth was needed
    assert k >= max(1, math.ceil(ratio * n - 1e-9))
    assert k == max(int(base.sum()), math.ceil(ratio * n - 1e-9))
    assert bool((m | ~base).all()), "growth must keep every cell the box kept"
    # every cell overlapping the (clipped) box with positive area is kept
    x1, y1, x2, y2 = box
    for r in range(rows):
        for c in range(cols):
            ox = min(x2, (c + 1) * CELL) - max(x1, c * CELL)
            oy = min(y2, (r + 1) * CELL) - max(y1, r * CELL)
            if ox > 1e-6 and oy > 1e-6:
                assert base[r, c]


def test_keep_mask_margin_and_growth_order():
    m = box_to_keep_mask([28, 28, 56, 56], (5, 5))  # exactly cell (1, 1)
    assert kept_token_indices(m).tolist() == [6]
    m1 = box_to_keep_mask([28, 28, 56, 56], (5, 5), margin_cells=1)
    assert int(m1.sum()) == 9 and bool(m1[0:3, 0:3].all())
    g = box_to_keep_mask([28, 28, 56, 56], (5, 5), min_keep_ratio=5 / 25)
    # grows into the 4-neighbours first (closest to the box centre), not the diagonals
    assert sorted(kept_token_indices(g).tolist()) == [1, 5, 6, 7, 11]
    assert bool(box_to_keep_mask(None, (3, 4)).all())
    with pytest.raises(ValueError):
        box_to_keep_mask([0, 0, 10, 10], (3, 3), min_keep_ratio=1.5)
    with pytest.raises(ValueError):
        box_to_keep_mask([0, float("nan"), 10, 10], (3, 3))


def test_keep_mask_text_key_shares_equal_masks():
    a = box_to_keep_mask([30, 30, 50, 50], (10, 10))
    b = box_to_keep_mask([29, 29, 55, 55], (10, 10))  # same cell, other box
    c = box_to_keep_mask([30, 30, 80, 50], (10, 10))
    assert KeepMask(a).encode() == KeepMask(b).encode() != KeepMask(c).encode()
    assert torch.equal(KeepMask.decode(KeepMask(c).encode()).cells, c)


def _hf_rope(model, input_ids, grid, attention_mask=None):
    mm = (input_ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(
        input_ids.unsqueeze(0), mm.unsqueeze(0), image_grid_thw=grid, attention_mask=attention_mask
    )
    return pos[:, 0]


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)


@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_mrope_unpruned_equals_transformers(tiny_model, cells, text_len):
    """With no pruning, our positions equal transformers' get_rope_index exactly."""
    cfg = tiny_model.config
    ids, grid = [1, 2, 3], []
    for rows, cols in cells:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (rows * cols) + [cfg.vision_end_token_id]
        ids += list(range(10, 10 + text_len))
        grid.append([1, rows * 2, cols * 2])
    input_ids = torch.tensor(ids)
    grid_t = torch.tensor(grid)
    ours = mrope_position_ids(input_ids, grid_t, cfg.image_token_id)
    assert torch.equal(ours, _hf_rope(tiny_model, input_ids, grid_t))


def test_mrope_with_padding_equals_transformers(tiny_model):
    cfg = tiny_model.config
    ids = [0, 0, 5, cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id, 7, 8]
    am = torch.tensor([0, 0] + [1] * (len(ids) - 2))
    grid = torch.tensor([[1, 4, 6]])
    ours = mrope_position_ids(torch.tensor(ids), grid, cfg.image_token_id, attention_mask=am)
    assert torch.equal(ours, _hf_rope(tiny_model, torch.tensor(ids), grid, am.unsqueeze(0)))


@given(st.integers(1, 10), st.integers(1, 10), st.data())
@settings(max_examples=80, deadline=None)
def test_mrope_pruned_is_unpruned_restricted(rows, cols, data):
    """Pruned positions = unpruned positions at the kept tokens; text after is unchanged."""
    img_tok = 99
    flat = data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols).filter(any))
    mask = torch.tensor(flat).view(rows, cols)
    pre, post = [1, 2, 3], [4, 5]
    full_ids = torch.tensor(pre + [img_tok] * (rows * cols) + post)
    pruned_ids = torch.tensor(pre + [img_tok] * int(mask.sum()) + post)
    grid = [[1, 2 * rows, 2 * cols]]
    full = mrope_position_ids(full_ids, grid, img_tok)
    pruned = mrope_position_ids(pruned_ids, grid, img_tok, keep_masks=[mask])
    keep = torch.tensor([True] * len(pre) + flat + [True] * len(post))
    assert torch.equal(pruned, full[:, keep])
    assert torch.equal(vision_positions(grid[0], mask), vision_positions(grid[0])[:, kept_token_indices(mask)])


def test_mrope_mismatch_raises():
    with pytest.raises(ValueError, match="image tokens"):
        mrope_position_ids(torch.tensor([1, 9, 9, 2]), [[1, 4, 4]], 9)
    with pytest.raises(ValueError, match="images"):
        mrope_position_ids(torch.tensor([1, 2]), [[1, 4, 4]], 9)


def test_geometry_from_grid_roundtrip():
    g = image_geometry(512, 384)
    assert geometry_from_grid(g.grid_thw).resized_size == g.resized_size
