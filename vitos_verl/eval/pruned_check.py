"""Pruned generation check on real data with a transformers Qwen2.5-VL.

For each row of a prepared parquet: build the reasoning prompt, keep the visual tokens of
the ground-truth box (or the whole image when a row has none), check that a full keep mask
reproduces the stock forward exactly, and decode a few tokens greedily from the pruned
prompt. Prints, per row, the visual tokens kept and the prompt lengths.

    python -m vitos_verl.eval.pruned_check --model outputs/models/tiny-qwen2.5-vl \
        --data outputs/data/slake/test.parquet --num 8
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from vitos_verl.data.prompts import to_content_list
from vitos_verl.pruning import box_to_keep_mask, box_to_resized, geometry_from_grid, keep_ratio, mrope_position_ids
from vitos_verl.pruning.boxes import union_box
from vitos_verl.rollout.pruned_inputs import prune_input_ids, pruned_inputs_embeds


def encode_row(processor, row: dict[str, Any], stream: str = "reasoning") -> dict[str, Any]:
    """Processor outputs (full image) of one parquet row's stream prompt."""
    key = "prompt" if stream == "grounding" else "reasoning_prompt"
    text = processor.apply_chat_template(to_content_list(row[key]), add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
    return processor(text=[text], images=[image], return_tensors="pt")


@torch.no_grad()
def decode_pruned(model, enc, keep_masks, max_new_tokens: int, temperature: float = 0.0,
                  generator: torch.Generator | None = None, use_cache: bool = False) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """Decode from a pruned prompt with transformers (small models: one prompt, eager).

    Args:
        model: a transformers ``Qwen2_5_VLForConditionalGeneration``.
        enc: the processor's outputs for one prompt (full image: ``input_ids`` (1, L),
            ``pixel_values``, ``image_grid_thw`` (n_images, 3)).
        keep_masks: one bool mask per image over its LLM visual tokens (``(h/2, w/2)`` cells of
            the resized image), :func:`vitos_verl.pruning.box_to_keep_mask`; all-True keeps all.
        max_new_tokens: stop after this many tokens (or at the text model's EOS).
        temperature: 0 decodes greedily; > 0 samples from ``softmax(logits / temperature)``.
        generator: the sampling generator (seed it for repeatable samples).
        use_cache: keep transformers' KV cache between tokens (feeding each new token with its
            M-RoPE position); False recomputes the whole sequence every token (the reference).

    Returns:
        generated token ids and the first step's logits ``(V,)`` (float32 as the model computes).
    """
    image_token_id = model.config.image_token_id
    ids = prune_input_ids(enc["input_ids"][0], enc["image_grid_thw"], keep_masks, image_token_id)
    pos = mrope_position_ids(ids, enc["image_grid_thw"], image_token_id, keep_masks)
    embeds = pruned_inputs_embeds(model, ids, enc["pixel_values"], enc["image_grid_thw"], keep_masks)
    out, first, cache = [], None, None
    for _ in range(max_new_tokens):
        if use_cache:  # feed only what the cache has not seen
            seen = 0 if cache is None else cache.get_seq_length()
            res = model(inputs_embeds=embeds[:, seen:], position_ids=pos[:, seen:].unsqueeze(1),
                        past_key_values=cache, use_cache=True)  # fmt: skip
            cache = res.past_key_values
        else:
            res = model(inputs_embeds=embeds, position_ids=pos.unsqueeze(1))
        logits = res.logits[0, -1]
        first = logits if first is None else first
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=generator))
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if tok == model.config.text_config.eos_token_id:
            break
        nxt = model.model.get_input_embeddings()(torch.tensor([[tok]]))
        embeds = torch.cat([embeds, nxt], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return out, first


def greedy_pruned(model, enc, keep_masks, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy :func:`decode_pruned`."""
    return decode_pruned(model, enc, keep_masks, max_new_tokens)


def run(model_dir: str, data: str, num: int, max_new_tokens: int, margin_cells: int, min_keep_ratio: float) -> dict:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows, seen = [], set()
    for row in pq.read_table(data).to_pylist():  # one row per distinct image, rows with boxes first
        path = row["images"][0]["path"]
        if path not in seen and (row["extra_info"]["gt_boxes"] or len(rows) >= num // 2):
            seen.add(path)
            rows.append(row)
        if len(rows) == num:
            break
    results = []
    t0 = time.perf_counter()
    for row in rows:
        enc = encode_row(processor, row)
        grid = enc["image_grid_thw"]
        geom = geometry_from_grid(grid[0], tuple(row["extra_info"]["image_size"]))
        gt = row["extra_info"]["gt_boxes"]
        box = None
        if gt:
            box = union_box([box_to_resized(b, geom) for b in gt])
        mask = box_to_keep_mask(box, geom.cell_grid, margin_cells, min_keep_ratio)
        # full mask == stock model: the identity check of the pruned path
        with torch.no_grad():
            stock = model(**enc).logits[0, -1]
        _, full_first = greedy_pruned(model, enc, [torch.ones_like(mask)], 1)
        gen, _ = greedy_pruned(model, enc, [mask], max_new_tokens)
        results.append(
            {
                "record": row["extra_info"]["record_id"],
                "image_tokens": geom.num_tokens,
                "kept_tokens": int(mask.sum()),
                "keep_ratio": keep_ratio(mask),
                "prompt_tokens_full": int(enc["input_ids"].shape[1]),
                "prompt_tokens_pruned": int(enc["input_ids"].shape[1]) - geom.num_tokens + int(mask.sum()),
                "full_mask_max_abs_diff": float((stock - full_first).abs().max()),
                "generated": processor.tokenizer.decode(gen)[:60],
            }
        )
        r = results[-1]
        print(
            f"{r['record']:>8s} tokens {r['image_tokens']:5d} -> {r['kept_tokens']:5d} (keep {r['keep_ratio']:.3f}) "
            f"prompt {r['prompt_tokens_full']} -> {r['prompt_tokens_pruned']}  full-mask |dlogit|={r['full_mask_max_abs_diff']:.2e}"
        )
    n = max(len(results), 1)
    summary = {
        "rows": len(results),
        "mean_keep_ratio": sum(r["keep_ratio"] for r in results) / n,
        "prompt_token_ratio": sum(r["prompt_tokens_pruned"] for r in results) / max(sum(r["prompt_tokens_full"] for r in results), 1),
        "max_full_mask_diff": max((r["full_mask_max_abs_diff"] for r in results), default=0.0),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, indent=2))
    return {"summary": summary, "rows": results}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.pruned_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--margin-cells", type=int, default=1)
    p.add_argument("--min-keep-ratio", type=float, default=0.0)
    a = p.parse_args(argv)
    out = run(a.model, str(a.data), a.num, a.max_new_tokens, a.margin_cells, a.min_keep_ratio)
    if out["summary"]["max_full_mask_diff"] > 1e-4:
        raise SystemExit(f"full keep mask differs from the stock forward: {out['summary']['max_full_mask_diff']:.3e}")
    return out


if __name__ == "__main__":
    main()
