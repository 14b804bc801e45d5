"""Is a warm start right often enough, when sampled, for GRPO to sharpen it? (transformers, CPU)

GRPO raises what a policy already samples right more often than its alternatives; a warm start
whose greedy outputs look good but whose samples are at chance gives it nothing to work with
(docs/learning.md section 3: seed 1's 250-step warm start validated at accuracy 0.37 greedy while
its sampled answers were at chance, and 30 GRPO steps left it there). This probe measures what the
first GRPO step will see, on the first ``num`` rows of a prepared parquet that have ground-truth
boxes, each stream sampled at ``temperature`` as the rollout samples it:

- grounding: the grounding prompt on the full image; the sampled box's IoU against the
  ground truth (:func:`vitos_verl.rewards.score.grounding_score`: 0 for an output without a box)
  and the share of outputs with a box;
- reasoning: the reasoning prompt on the image pruned to the ground-truth box (the tokens a right
  box keeps, ``margin_cells`` as the recipe's); the sampled answer's accuracy
  (:func:`vitos_verl.rewards.score.reasoning_score`) and format.

Decoding is :func:`vitos_verl.eval.pruned_check.decode_pruned` with the KV cache (one prompt at
a time: for the tiny policies). ``--pick`` (:func:`pick`, used by ``scripts/learn_cpu.sh``'s
``SFT_PICK``) probes an SFT run's kept steps in order and names the first whose sampled IoU and
accuracy both reach a threshold.

    python -m vitos_verl.eval.warmstart_probe --model outputs/models/learn-learn-sft250-seed0 \\
        --data outputs/data/sparse_evidence-seed0/val.parquet --num 64 --out probe.json
    python -m vitos_verl.eval.warmstart_probe --pick 0.4 --model outputs/models/learn-learn-sft{100,125,150}-seed0 \\
        --data outputs/data/sparse_evidence-seed0/val.parquet --out pick.json   # prints the picked folder
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from vitos_verl.atomic import atomic_write_text
from vitos_verl.data.prompts import row_chat, to_content_list
from vitos_verl.eval.pruned_check import decode_pruned
from vitos_verl.pruning import box_to_keep_mask, box_to_resized, geometry_from_grid
from vitos_verl.pruning.boxes import union_box
from vitos_verl.rewards.score import grounding_score, reasoning_score


def _encode(processor, chat, image: Image.Image) -> dict[str, Any]:
    text = processor.apply_chat_template(to_content_list(chat), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def probe(model_dir: str | Path, data: str | Path, num: int = 64, temperature: float = 1.0, seed: int = 0,
          max_new_tokens: int = 32, margin_cells: int = 1) -> dict[str, Any]:  # fmt: skip
    """Sampled box IoU and answer accuracy of the policy in ``model_dir`` (see module doc).

    Args:
        model_dir: a Hugging Face Qwen2.5-VL folder with its processor (its ``max_pixels`` is the
            recipe's: the probe sees the images as the rollout does).
        data: a parquet in the row schema (``data_prep``): ``prompt`` / ``reasoning_prompt`` chats,
            ``images``, ``reward_model.ground_truth``, ``extra_info.{image_size, gt_boxes, answer_type}``
            (boxes in original-image pixels).
        num: rows probed (the first ``num`` with ``gt_boxes``), one sample per stream each.
        temperature: the rollout's sampling temperature (1.0 in every recipe).
        seed: seeds the sampling generator.
        max_new_tokens: per output (the recipe's ``max_response_length``).
        margin_cells: cells kept around the ground-truth box (the recipe's ``vitos.margin_cells``).

    Returns:
        ``{"model", "rows", "box_iou", "box_format", "answer_acc", "answer_format", "seconds"}``:
        means over the rows (IoU in the resized image's pixels, as the reward computes it).

    Raises:
        ValueError: no row of ``data`` has a ground-truth box.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    rows = [r for r in pq.read_table(data).to_pylist() if (r["extra_info"] or {}).get("gt_boxes")][:num]
    if not rows:
        raise ValueError(f"{data}: no row has extra_info.gt_boxes")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ip = processor.image_processor
    pixels = {"min_pixels": int(getattr(ip, "min_pixels", None) or ip.size["shortest_edge"]),
              "max_pixels": int(getattr(ip, "max_pixels", None) or ip.size["longest_edge"])}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tot = {"box_iou": 0.0, "box_format": 0.0, "answer_acc": 0.0, "answer_format": 0.0}
    t0 = time.perf_counter()
    for row in rows:
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        info = row["extra_info"]
        enc = _encode(processor, row_chat(row, "grounding"), image)
        geom = geometry_from_grid(enc["image_grid_thw"][0], tuple(info["image_size"]))
        full = torch.ones(geom.cell_grid, dtype=torch.bool)
        out, _ = decode_pruned(model, enc, [full], max_new_tokens, temperature, gen, use_cache=True)
        g = grounding_score(processor.tokenizer.decode(out, skip_special_tokens=True), info, **pixels)
        tot["box_iou"] += g["iou"]
        tot["box_format"] += g["parsed"]
        enc = _encode(processor, row["reasoning_prompt"], image)
        box = union_box([box_to_resized(b, geom) for b in info["gt_boxes"]])
        mask = box_to_keep_mask(box, geom.cell_grid, margin_cells, 0.0)
        out, _ = decode_pruned(model, enc, [mask], max_new_tokens, temperature, gen, use_cache=True)
        r = reasoning_score(processor.tokenizer.decode(out, skip_special_tokens=True),
                            str(row["reward_model"]["ground_truth"]), info)  # fmt: skip
        tot["answer_acc"] += r["acc"]
        tot["answer_format"] += r["format"]
    res: dict[str, Any] = {"model": str(model_dir), "rows": len(rows)}
    res.update({k: v / len(rows) for k, v in tot.items()})
    res["seconds"] = time.perf_counter() - t0
    return res


def pick(models: Sequence[str | Path], data: str | Path, threshold: float, out: str | Path | None = None,
         **probe_kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """Probe ``models`` in order (e.g. an SFT run's kept steps, earliest first) and pick the first
    whose sampled ``box_iou`` and ``answer_acc`` both reach ``threshold`` (the probes stop there),
    or the last model when none does.

    Args:
        models: warm-start folders, in the order to try them.
        data, probe_kwargs: as :func:`probe`.
        threshold: the minimum of both sampled rates (chance is 0.25 for both on ``make learn``'s
            task).
        out: also write the result here (JSON).

    Returns:
        ``{"threshold", "picked": <model folder>, "met": bool, "probes": [probe results, in order]}``.

    Raises:
        ValueError: ``models`` is empty.
    """
    if not models:
        raise ValueError("no warm start to probe")
    probes = []
    for model in models:
        probes.append(probe(model, data, **probe_kwargs))
        print("warmstart_probe: " + json.dumps(probes[-1]), file=sys.stderr, flush=True)
        if probes[-1]["box_iou"] >= threshold and probes[-1]["answer_acc"] >= threshold:
            break
    last = probes[-1]
    met = last["box_iou"] >= threshold and last["answer_acc"] >= threshold
    if not met:
        print(f"warmstart_probe: no warm start reached {threshold} on both; picking the last, {last['model']}",
              file=sys.stderr)  # fmt: skip
    res = {"threshold": threshold, "picked": last["model"], "met": met, "probes": probes}
    if out:
        atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.warmstart_probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="a warm start; with --pick, several, in the order to try")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--margin-cells", type=int, default=1)
    p.add_argument("--pick", type=float, metavar="THRESHOLD",
                   help="probe the --model folders in order and print the first whose sampled IoU and accuracy reach it")  # fmt: skip
    p.add_argument("--out", type=Path, help="also write the result here (JSON)")
    a = p.parse_args(argv)
    kwargs = {"num": a.num, "temperature": a.temperature, "seed": a.seed, "max_new_tokens": a.max_new_tokens,
              "margin_cells": a.margin_cells}  # fmt: skip
    if a.pick is not None:
        res = pick(a.model, a.data, a.pick, a.out, **kwargs)
        print(res["picked"])
        return res
    if len(a.model) > 1:
        p.error("several --model folders need --pick")
    res = probe(a.model[0], a.data, **kwargs)
    text = json.dumps(res, indent=1)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
