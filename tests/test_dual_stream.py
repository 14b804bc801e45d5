"""Driver-side dual-stream steps and the agent-loop worker's pruned post-processing, on real
SLAKE rows read through verl's dataset, with the tiny checkpoint's processor."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from vitos_verl.pruning import (
    KeepMask,
    box_to_keep_mask,
    box_to_resized,
    image_geometry,
    keep_ratio,
    mrope_position_ids,
)
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.dual_stream import (
    grounding_rewards,
    group_spread,
    last_token_scores,
    plan_reasoning,
    replace_image,
)

MAX_PIXELS = 28 * 28 * 256


@pytest.fixture(scope="module")
def ds(slake_dataset):
    return slake_dataset(MAX_PIXELS)


def _rows_with_boxes(ds, n):
    out = []
    for i in range(0, len(ds), 37):
        row = ds[i]
        if row["extra_info"]["gt_boxes"]:
            out.append(row)
        if len(out) == n:
            return out
    raise AssertionError("not enough rows with boxes")


def _geom(row):
    return image_geometry(*row["extra_info"]["image_size"], min_pixels=3136, max_pixels=MAX_PIXELS)


def test_dataset_returns_both_stream_chats(ds):
    row = ds[0]
    assert "raw_reasoning_prompt" in row and "reasoning_prompt" not in row
    g_text = row["raw_prompt"][0]["content"][-1]["text"]
    r_text = row["raw_reasoning_prompt"][0]["content"][-1]["text"]
    assert "<box>" in g_text and "<answer>" in r_text
    assert row["raw_prompt"][0]["content"][0]["max_pixels"] == MAX_PIXELS


def test_plan_reasoning_masks_from_gt_boxes(ds):
    """A grounding output holding the (resized) gt box keeps exactly that box's cells."""
    cfg = ViToSConfig(n_g=2, n_r=3, margin_cells=0)
    rows = _rows_with_boxes(ds, 3)
    texts, grids, sizes, chats, expected = [], [], [], [], []
    for row in rows:
        g = _geom(row)
        box = box_to_resized(row["extra_info"]["gt_boxes"][0], g)
        texts += [f"<box>[{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]</box>", "no box here"]
        grids += [list(g.grid_thw)] * 2
        sizes += [row["extra_info"]["image_size"]] * 2
        chats += [row["raw_reasoning_prompt"]] * 2
        expected += [box_to_keep_mask(box, g.cell_grid), None]
    plan = plan_reasoning(texts, grids, sizes, chats, cfg)
    assert len(plan.box_index) == 6 * 3
    assert plan.box_index.tolist() == [i for i in range(6) for _ in range(3)]
    assert plan.parsed.tolist() == [True, False] * 3
    for j, (keep, ratio) in enumerate(zip(plan.vitos_keep, plan.keep_ratio)):
        exp = expected[plan.box_index[j]]
        if exp is None:  # unparseable: every token kept, no plugin kwarg
            assert keep == "" and ratio == 1.0
        else:
            assert torch.equal(KeepMask.decode(keep).cells, exp)
            assert ratio == pytest.approx(keep_ratio(exp)) and ratio < 0.5


def test_plan_reasoning_crop_and_none(ds):
    row = _rows_with_boxes(ds, 1)[0]
    g = _geom(row)
    box = box_to_resized(row["extra_info"]["gt_boxes"][0], g)
    text = f"<box>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</box>"
    args = ([text], [list(g.grid_thw)], [row["extra_info"]["image_size"]], [row["raw_reasoning_prompt"]])
    crop = plan_reasoning(*args, ViToSConfig(prune_mode="crop", n_r=1, margin_cells=0))
    img = crop.raw_prompt[0][0]["content"][0]["image"]
    orig = row["raw_reasoning_prompt"][0]["content"][0]["image"]
    assert crop.vitos_keep[0] == "" and img.size[0] < orig.size[0] and img.size[1] < orig.size[1]
    assert 0 < crop.keep_ratio[0] < 1
    none = plan_reasoning(*args, ViToSConfig(prune_mode="none", n_r=1))
    assert none.vitos_keep[0] == "" and none.keep_ratio[0] == 1.0 and none.raw_prompt[0] is args[3][0]
    # the dataset's messages are not modified by the crop
    assert row["raw_reasoning_prompt"][0]["content"][0]["image"] is orig
    assert replace_image(row["raw_reasoning_prompt"], img)[0]["content"][0]["image"] is img


def test_grounding_rewards_cross_feedback(ds):
    row = _rows_with_boxes(ds, 1)[0]
    g = _geom(row)
    box = box_to_resized(row["extra_info"]["gt_boxes"][0], g)
    good = f"<box>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</box>"
    texts = [good, good, "garbage"]
    info = [dict(row["extra_info"], resized_size=list(g.resized_size))] * 3
    kw = ViToSConfig().reward_kwargs(3136, MAX_PIXELS)
    # answers: box 0 -> [1, 1], box 1 -> [0, 0], box 2 -> [1, 0]
    out = grounding_rewards(["slake"] * 3, texts, ["x"] * 3, info, [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2], kw)
    assert out["feedback"].tolist() == [1.0, 0.0, 0.0]  # the garbage box earns none (no_feedback)
    keep_all = grounding_rewards(["slake"] * 3, texts, ["x"] * 3, info, [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2], {**kw, "unparsed_box": "keep_all"})
    assert keep_all["feedback"].tolist() == [1.0, 0.0, 0.5]  # its answers' accuracy under keep_all
    assert out["iou"][0] == pytest.approx(1.0, abs=1e-6) and out["iou"][2] == 0.0
    # same box, different feedback: the score differs by exactly w_fb * (1 - 0)
    assert out["score"][0] - out["score"][1] == pytest.approx(kw["w_fb"])
    no_fb = grounding_rewards(["slake"] * 3, texts, ["x"] * 3, info, [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2], {**kw, "w_fb": 0.0})
    assert no_fb["score"][0] == pytest.approx(no_fb["score"][1])


def test_last_token_scores_and_group_spread():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    out = last_token_scores([2.0, -1.0, 0.5], mask)
    assert out[0, 2] == 2.0 and out[1, 0] == -1.0 and out[2, 0] == 0.5 and out.sum() == pytest.approx(1.5)
    std, frac = group_spread([1, 1, 0, 1], ["a", "a", "b", "b"])
    assert std == pytest.approx(0.25) and frac == 0.5


def test_agent_loop_worker_rebuilds_pruned_inputs(ds, tiny_ckpt):
    """verl's post-processing, through our worker, gives the actor the rollout's pruned sequence:
    pruned ids, the full image's pixels, the keep mask, and the original M-RoPE positions."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, AgentLoopWorker
    from verl.utils.tokenizer.tokenizer import hf_processor

    from vitos_verl.pruning import KEEP_FIELD as KEEP_KEY
    from vitos_verl.rollout.agent_loop import ViToSAgentLoopWorker
    from vitos_verl.rollout.pruned_inputs import prune_input_ids

    tiny_processor = hf_processor(str(tiny_ckpt))  # verl's: get_rope_index bound, as in its workers
    worker = object.__new__(ViToSAgentLoopWorker)
    worker.processor, worker.tokenizer = tiny_processor, tiny_processor.tokenizer
    worker.mm_processor_kwargs = {}
    row = _rows_with_boxes(ds, 1)[0]
    g = _geom(row)
    mask = box_to_keep_mask(box_to_resized(row["extra_info"]["gt_boxes"][0], g), g.cell_grid, margin_cells=1)
    messages = row["raw_reasoning_prompt"]
    images, _ = asyncio.run(ds.process_vision_info(messages, ds.image_patch_size, ds.config))
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tiny_processor(text=[text], images=images, return_tensors="pt")
    img_id = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pruned = prune_input_ids(full["input_ids"][0], full["image_grid_thw"], [mask], img_id)
    response = tiny_processor.tokenizer.encode("<answer>yes</answer>")
    out = AgentLoopOutput(
        prompt_ids=pruned.tolist(), response_ids=response, response_mask=[1] * len(response),
        multi_modal_data={"images": images}, mm_processor_kwargs={"vitos_keep": KeepMask(mask).encode()},
        num_turns=2, metrics={},
    )
    ids = torch.tensor([pruned.tolist() + response])
    pad = 5  # verl left-pads prompts
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    attn = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, ids.shape[1] - pad, dtype=torch.long)], 1)
    mm = worker._compute_multi_modal_inputs(out, ids)
    assert torch.equal(mm["pixel_values"], full["pixel_values"])
    assert torch.equal(mm["image_grid_thw"], full["image_grid_thw"])
    assert torch.equal(mm[KEEP_KEY], mask.flatten())
    assert int((ids == img_id).sum()) == int(mask.sum()) < int(mask.numel())
    pos = worker._compute_position_ids(ids, attn, mm, out.mm_processor_kwargs)
    assert pos.shape == (1, 4, ids.shape[1])
    expect = mrope_position_ids(ids[0, pad:], full["image_grid_thw"], img_id, [mask])
    assert torch.equal(pos[0, 1:, pad:], expect)
    assert torch.equal(pos[0, 0, pad:], torch.arange(ids.shape[1] - pad))
    # a grounding (unpruned) sample: all-True mask, positions equal verl's own get_rope_index path
    out_full = out.model_copy(update={"prompt_ids": full["input_ids"][0].tolist(), "mm_processor_kwargs": {}})
    ids_full = torch.tensor([full["input_ids"][0].tolist() + response])
    attn_full = torch.ones_like(ids_full)
    mm_full = worker._compute_multi_modal_inputs(out_full, ids_full)
    assert bool(mm_full[KEEP_KEY].all()) and mm_full[KEEP_KEY].numel() == mask.numel()
    ours = worker._compute_position_ids(ids_full, attn_full, dict(mm_full), {})
    mm_stock = dict(mm_full)
    mm_stock.pop(KEEP_KEY)
    theirs = AgentLoopWorker._compute_position_ids(worker, ids_full, attn_full, mm_stock, {})
    assert torch.equal(ours, theirs)
    assert np.isfinite(pos.numpy()).all()
