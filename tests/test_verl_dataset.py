"""Parquet rows read back through verl 0.9.1's RLHFDataset and the tiny model's processor."""

from __future__ import annotations

import asyncio

import pytest
import torch
from omegaconf import OmegaConf

from vitos_verl.pruning import image_geometry


def _load(cls, parquet, tiny_processor, tmp_path, **extra):
    cfg = OmegaConf.create(
        {"prompt_key": "prompt", "image_key": "images", "max_prompt_length": 4096, "filter_overlong_prompts": False,
         "cache_dir": str(tmp_path / "verl-cache"), **extra}
    )
    return cls(str(parquet), tiny_processor.tokenizer, cfg, tiny_processor)


def _encode(ds, item, processor):
    """What verl's agent loop does with a dataset item before the rollout."""
    row = ds[item]
    messages = row["raw_prompt"]
    images, _ = asyncio.run(ds.process_vision_info(messages, ds.image_patch_size, ds.config))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return row, processor(text=[text], images=images, return_tensors="pt")


@pytest.mark.parametrize("max_pixels", [None, 28 * 28 * 256])
def test_image_tokens_match_geometry(slake_test_parquet, tiny_processor, tmp_path, max_pixels):
    from vitos_verl.data.dataset import ViToSDataset

    extra = {"max_pixels": max_pixels} if max_pixels else {}
    ds = _load(ViToSDataset, slake_test_parquet, tiny_processor, tmp_path, **extra)
    assert len(ds) == 1052
    budget = max_pixels or tiny_processor.image_processor.size["longest_edge"]
    for item in range(0, len(ds), 75):
        row, enc = _encode(ds, item, tiny_processor)
        n_tokens = int((enc["input_ids"][0] == tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        grid = enc["image_grid_thw"][0]
        assert n_tokens == int(grid.prod()) // 4
        g = image_geometry(*row["extra_info"]["image_size"], min_pixels=3136, max_pixels=budget)
        assert tuple(grid.tolist()) == g.grid_thw, (row["extra_info"]["image_size"], grid, g)
        assert row["reward_model"]["ground_truth"] == row["extra_info"]["answer"]


def test_stock_dataset_reads_rows(slake_test_parquet, tiny_processor, tmp_path):
    """The plain RLHFDataset reads our parquet too (its grid is self-consistent)."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    ds = _load(RLHFDataset, slake_test_parquet, tiny_processor, tmp_path)
    row, enc = _encode(ds, 0, tiny_processor)
    n_tokens = int((enc["input_ids"][0] == 151655).sum())
    assert n_tokens == int(enc["image_grid_thw"][0].prod()) // 4 > 0
    assert isinstance(row["extra_info"]["gt_boxes"], list)
    assert torch.is_tensor(row["dummy_tensor"])
