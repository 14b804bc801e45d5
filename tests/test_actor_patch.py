"""The actor-side pruning patch inside verl 0.9.1's patched Qwen2.5-VL forward.

The reference is the transformers forward on the same pruned inputs that tests/test_vllm_parity.py
shows equal to vLLM's plugin, so agreement here closes the rollout/actor loop.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vitos_verl.data.prompts import to_content_list
from vitos_verl.pruning import box_to_keep_mask, box_to_resized, geometry_from_grid, mrope_position_ids
from vitos_verl.rollout.pruned_inputs import prune_input_ids, pruned_inputs_embeds

IMAGE_PAD = 151655


@pytest.fixture()
def restore_transformers_classes():
    """verl's monkey patch and ours replace class methods: undo them for the other tests."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m2

    saved = [
        (cls, name, cls.__dict__[name])
        for mod in (m25, m2)
        for cls in vars(mod).values()
        if isinstance(cls, type) and cls.__module__ == mod.__name__
        for name in ("forward",)
        if name in cls.__dict__
    ]
    yield
    for cls, name, fn in saved:
        setattr(cls, name, fn)


def _case(slake_test_parquet, processor):
    row = next(r for r in pq.read_table(slake_test_parquet).slice(0, 200).to_pylist() if r["extra_info"]["gt_boxes"])
    image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
    text = processor.apply_chat_template(to_content_list(row["reasoning_prompt"]), add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    geom = geometry_from_grid(enc["image_grid_thw"][0], tuple(row["extra_info"]["image_size"]))
    mask = box_to_keep_mask(box_to_resized(row["extra_info"]["gt_boxes"][0], geom), geom.cell_grid, margin_cells=2)
    return enc, mask


def test_verl_patched_forward_prunes_like_the_rollout(tiny_ckpt, tiny_processor, slake_test_parquet, restore_transformers_classes):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    from vitos_verl.rollout.actor_patch import apply_actor_patch

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    enc, mask = _case(slake_test_parquet, tiny_processor)
    response = torch.tensor([151667, 785, 2168, 151668, 27, 9217, 29])  # "<think> ... </think><answer>"
    ids = torch.cat([prune_input_ids(enc["input_ids"][0], enc["image_grid_thw"], [mask], IMAGE_PAD), response])
    mrope = mrope_position_ids(ids, enc["image_grid_thw"], IMAGE_PAD, [mask])
    with torch.no_grad():  # reference: stock transformers on the pruned embeddings (vLLM-verified path)
        embeds = pruned_inputs_embeds(model, ids, enc["pixel_values"], enc["image_grid_thw"], [mask])
        ref = model(inputs_embeds=embeds, position_ids=mrope.unsqueeze(1)).logits[0]
        ref_full = model(**enc).logits[0]

    apply_monkey_patch(model, use_remove_padding=False)
    apply_actor_patch()
    apply_actor_patch()  # idempotent
    # what verl's dp_actor passes: (4, B, L) position ids (text row + M-RoPE) and the multi_modal_inputs
    position_ids = torch.cat([torch.arange(len(ids)).view(1, -1), mrope]).unsqueeze(1)
    with torch.no_grad():
        out = model(
            input_ids=ids.unsqueeze(0),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            position_ids=position_ids,
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            vitos_keep_mask=mask.flatten(),
            use_cache=False,
        ).logits[0]
    assert (out - ref).abs().max() < 1e-4
    # no keep mask: verl's own forward on the full prompt, unchanged
    full_ids = enc["input_ids"][0]
    full_mrope = mrope_position_ids(full_ids, enc["image_grid_thw"], IMAGE_PAD)
    with torch.no_grad():
        out_full = model(
            input_ids=full_ids.unsqueeze(0),
            attention_mask=torch.ones(1, len(full_ids), dtype=torch.long),
            position_ids=torch.cat([torch.arange(len(full_ids)).view(1, -1), full_mrope]).unsqueeze(1),
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            use_cache=False,
        ).logits[0]
    assert (out_full - ref_full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="vitos_keep_mask has"):
        model(
            input_ids=ids.unsqueeze(0),
            position_ids=position_ids,
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            vitos_keep_mask=mask.flatten()[:-1],
        )
