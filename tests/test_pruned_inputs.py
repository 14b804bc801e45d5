"""The transformers-side pruned forward on real SLAKE rows with their ground-truth boxes."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from vitos_verl.eval.pruned_check import encode_row, greedy_pruned
from vitos_verl.pruning import box_to_keep_mask, box_to_resized, geometry_from_grid, mrope_position_ids
from vitos_verl.rollout.pruned_inputs import prune_input_ids


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


def test_full_mask_is_stock_and_pruned_has_k_tokens(slake_test_parquet, tiny_processor, model):
    rows = [r for r in pq.read_table(slake_test_parquet).slice(0, 40).to_pylist() if r["extra_info"]["gt_boxes"]][:2]
    for row in rows:
        enc = encode_row(tiny_processor, row)
        geom = geometry_from_grid(enc["image_grid_thw"][0], tuple(row["extra_info"]["image_size"]))
        mask = box_to_keep_mask(box_to_resized(row["extra_info"]["gt_boxes"][0], geom), geom.cell_grid, 1)
        with torch.no_grad():
            stock = model(**enc).logits[0, -1]
        _, full = greedy_pruned(model, enc, [torch.ones_like(mask)], 1)
        assert (stock - full).abs().max() < 1e-5
        ids = prune_input_ids(enc["input_ids"][0], enc["image_grid_thw"], [mask], model.config.image_token_id)
        assert int((ids == model.config.image_token_id).sum()) == int(mask.sum()) < geom.num_tokens
        assert ids.shape[0] == enc["input_ids"].shape[1] - geom.num_tokens + int(mask.sum())
        # the text after the image keeps its unpruned positions
        pos = mrope_position_ids(ids, enc["image_grid_thw"], model.config.image_token_id, [mask])
        full_pos = mrope_position_ids(enc["input_ids"][0], enc["image_grid_thw"], model.config.image_token_id, [None])
        assert torch.equal(pos[:, -5:], full_pos[:, -5:])
        _, pruned = greedy_pruned(model, enc, [mask], 1)
        assert (pruned - stock).abs().max() > 1e-6  # pruning changes the input
