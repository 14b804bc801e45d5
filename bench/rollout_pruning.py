"""Reasoning-rollout cost of visual-token pruning, measured as GRPO runs it (docs/design.md section 1b).

Every arm generates ``n`` answers per question for the same real SLAKE test images, with
vLLM's prefix caching on, and is timed twice from cold caches (prefix cache and the plugin's
ViT cache reset): once with one new token (prefill, ViT included) and once with the full
answer length; decode = total - prefill. Arms:

* ``full``: full visual tokens, one prompt with ``n`` samples (they share one prefill): the
  strongest baseline a user would run;
* ``pruned k=r``: ``n`` different boxes (one answer each) keeping a fraction ``r`` of the
  visual tokens, r in 0.77 / 0.5 / 0.25;
* ``pruned k=0.5 BxA``: B distinct boxes with A answers each (``n_r > 1``);
* ``crop k=0.5``: ``n`` different box crops of the original image (28-px aligned).

``prompts`` counts requests (a request with ``n`` samples is one prompt); ``computed`` and
``cached`` are prompt tokens prefilled and read from the prefix cache over every sample, from
vLLM's engine counters (``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``).

It prints one table, then the analytic ratio for Qwen2.5-VL-7B on an A100 and, last,
``keep_ratio=<r> prompt_token_ratio=<x> time_ratio=<y>`` for the 0.77 arm against ``full``.

    python bench/rollout_pruning.py                       # tiny model, 4 images, n=8, 64 and 256 tokens
    python bench/rollout_pruning.py --model small         # ~0.5B random Qwen2.5-VL
"""

from __future__ import annotations

import argparse
import io
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- analytic model
@dataclass(frozen=True)
class GpuModel:
    """Qwen2.5-VL-7B on one A100-80GB in bf16 (public sizes; MFU and bandwidth are assumptions)."""

    llm_params: float = 7.6e9
    vit_flops_per_image: float = 7.3e12  # 1024x1024 image, docs/design.md section 1b
    kv_bytes_per_token: float = 57e3  # 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes
    peak_flops: float = 312e12
    mfu: float = 0.5
    hbm_bytes_per_s: float = 2.0e12
    groups_per_batch: int = 32  # questions decoded together (n answers each)


def analytic_time(k: float, n: int = 8, answer: int = 512, visual: int = 1369, text: int = 50, n_r: int = 1, g: GpuModel = GpuModel()) -> dict:
    """Seconds per question of the reasoning rollout: ViT + prefill (compute) + decode (bandwidth).

    ``k = 1`` is the full-token baseline (one prefix-cached prompt per question); ``k < 1``
    has ``n / n_r`` distinct pruned prompts, each prefilled once. The ViT runs once per image
    in both. Decode reads the weights once per step for the whole batch and every sequence's
    KV cache (its context grows from the prompt to prompt + answer).
    """
    prompt = int(round(k * visual)) + text
    prompts = 1 if k >= 1 else n // n_r
    flops_rate = g.peak_flops * g.mfu
    vit = g.vit_flops_per_image / flops_rate
    prefill = prompts * 2 * g.llm_params * prompt / flops_rate
    seqs = n * g.groups_per_batch
    kv = seqs * (prompt + answer / 2) * g.kv_bytes_per_token
    decode = answer * (2 * g.llm_params + kv) / g.hbm_bytes_per_s / g.groups_per_batch
    return {"vit": vit, "prefill": prefill, "decode": decode, "total": vit + prefill + decode}


# --------------------------------------------------------------------------- measured arms
class PeakRSS:
    """Peak resident memory of this process (the engine runs in-process) over a block."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def build_arms(cases, n: int, crop_keep: float, seed: int) -> dict[str, list[tuple[dict, int]]]:
    """Requests (vLLM prompt dict, samples) of every arm."""
    from vitos_verl.pruning import box_to_keep_mask, box_to_resized, crop_box, encode_keep_mask

    rng = random.Random(seed)

    def masks_for(case, ratio: float, count: int):
        g = case["geom"]
        x1, y1, x2, y2 = box_to_resized(case["box"], g)
        out, tries = [], 0
        while len(out) < count and tries < 50 * count:
            tries += 1
            dx, dy = rng.uniform(-56, 56), rng.uniform(-56, 56)  # jitter by up to two cells
            m = box_to_keep_mask([x1 + dx, y1 + dy, x2 + dx, y2 + dy], g.cell_grid, 0, ratio)
            if all(encode_keep_mask(m) != encode_keep_mask(o) for o in out):
                out.append(m)
        return out + out[: count - len(out)]  # tiny grids may not have `count` distinct masks

    def req(case, mask=None, image=None):
        r = {"prompt": case["text"], "multi_modal_data": {"image": image or case["image"]}}
        if mask is not None:
            r["mm_processor_kwargs"] = {"vitos_keep": encode_keep_mask(mask)}
        return r

    arms: dict[str, list] = {"full": [(req(c), n) for c in cases]}
    for ratio in (0.77, 0.5, 0.25):
        arms[f"pruned k={ratio}"] = [(req(c, m), 1) for c in cases for m in masks_for(c, ratio, n)]
    boxes = 2
    arms[f"pruned k=0.5 {boxes}x{n // boxes}"] = [(req(c, m), n // boxes) for c in cases for m in masks_for(c, 0.5, boxes)]
    crops = []
    for c in cases:
        for m in masks_for(c, crop_keep, n):
            crops.append((req(c, image=c["image"].crop(crop_box(m, c["geom"]))), 1))
    arms[f"crop k={crop_keep}"] = crops
    return arms


def prefix_cache_counters(llm) -> tuple[int, int] | None:
    """``(queried, hit)`` prompt tokens of vLLM's prefix cache so far (needs stats logging on)."""
    try:
        metrics = {m.name: m for m in llm.get_metrics()}
        return int(metrics["vllm:prefix_cache_queries"].value), int(metrics["vllm:prefix_cache_hits"].value)
    except (KeyError, AttributeError, AssertionError):
        return None


def run_arm(llm, requests, max_tokens: int) -> dict:
    """Time one arm from cold caches: prefill (1 token) and the full answer length.

    Sampling uses the engine's seed (a per-request seed breaks on vLLM's CPU generator).
    """
    from vllm import SamplingParams

    def once(tokens: int):
        llm.reset_prefix_cache()
        llm.apply_model(lambda m: m._vit_cache.clear() if hasattr(m, "_vit_cache") else None)
        prompts = [r for r, _ in requests]
        params = [SamplingParams(n=k, max_tokens=tokens, temperature=1.0, ignore_eos=True) for _, k in requests]
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, outs, mem.peak

    t_prefill, _, _ = once(1)
    before = prefix_cache_counters(llm)
    t_total, outs, peak = once(max_tokens)
    after = prefix_cache_counters(llm)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    if before is not None and after is not None:  # engine counters: every sample of every request
        queried, cached = after[0] - before[0], after[1] - before[1]
        prompt_tokens = queried
    else:
        cached = sum(o.num_cached_tokens or 0 for o in outs)
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    samples = sum(len(o.outputs) for o in outs)
    return {
        "prompts": len(outs),
        "samples": samples,
        "prompt_tokens": prompt_tokens,
        "computed": prompt_tokens - cached,
        "cached": cached,
        "prefill_s": t_prefill,
        "decode_s": max(t_total - t_prefill, 0.0),
        "total_s": t_total,
        "gen_tok_s": generated / t_total,
        "peak_gib": peak / 2**30,
        "mean_prompt": sum(len(o.prompt_token_ids) * len(o.outputs) for o in outs) / samples,
        "mean_context": sum((len(o.prompt_token_ids) + max_tokens) * len(o.outputs) for o in outs) / samples,
    }


def load_cases(parquet: Path, num: int, processor):
    import pyarrow.parquet as pq
    from PIL import Image

    from vitos_verl.data.prompts import to_content_list
    from vitos_verl.pruning import image_geometry

    cases, seen = [], set()
    for row in pq.read_table(parquet).to_pylist():
        info, path = row["extra_info"], row["images"][0]["path"]
        if not info["gt_boxes"] or path in seen:
            continue
        seen.add(path)
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        gt = info["gt_boxes"]
        box = [min(b[0] for b in gt), min(b[1] for b in gt), max(b[2] for b in gt), max(b[3] for b in gt)]
        text = processor.apply_chat_template(to_content_list(row["reasoning_prompt"]), add_generation_prompt=True, tokenize=False)
        ip = processor.image_processor
        geom = image_geometry(*image.size, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        cases.append({"image": image, "box": box, "text": text, "geom": geom})
        if len(cases) == num:
            break
    return cases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | small | path to a Qwen2.5-VL checkpoint")
    p.add_argument("--data", type=Path, default=ROOT / "outputs/data/slake/test.parquet")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--lengths", default="64,256")
    p.add_argument("--crop-keep", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: one RSS to measure
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoProcessor
    from vllm import LLM

    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint
    from vitos_verl.rollout.vllm_plugin import hf_overrides

    model = a.model
    if model in SIZES:
        model = str(build_tiny_checkpoint(ROOT / "outputs/models" / f"{model}-qwen2.5-vl", model))
    if not a.data.exists():
        raise SystemExit(f"{a.data} missing: run `make data` first")
    processor = AutoProcessor.from_pretrained(model)
    cases = load_cases(a.data, a.images, processor)
    lengths = [int(x) for x in a.lengths.split(",")]
    llm = LLM(
        model=model,
        hf_overrides=hf_overrides(),
        dtype=a.dtype,
        enable_prefix_caching=True,
        max_model_len=max(lengths) + 2048,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=64,
        kv_cache_memory_bytes=4 << 30,
        seed=a.seed,
        disable_log_stats=False,  # prefix-cache counters
    )
    arms = build_arms(cases, a.n, a.crop_keep, a.seed)
    for name in ("full", "pruned k=0.5"):  # warm-up: first-call costs (kernels, allocations) are not the arm's
        run_arm(llm, arms[name][:2], 2)
    print(f"model={a.model} images={len(cases)} n={a.n} prefix_caching=on dtype={a.dtype}")
    header = f"{'arm':22s} {'len':>4s} {'prompts':>7s} {'computed':>8s} {'cached':>7s} {'prefill_s':>9s} {'decode_s':>8s} {'total_s':>7s} {'gen_tok/s':>9s} {'peak_GiB':>8s} {'ctx':>6s}"
    results = {}
    for L in lengths:
        print(header)
        for name, reqs in arms.items():
            r = run_arm(llm, reqs, L)
            results[(name, L)] = r
            print(
                f"{name:22s} {L:4d} {r['prompts']:7d} {r['computed']:8d} {r['cached']:7d} {r['prefill_s']:9.2f} "
                f"{r['decode_s']:8.2f} {r['total_s']:7.2f} {r['gen_tok_s']:9.1f} {r['peak_gib']:8.2f} {r['mean_context']:6.0f}"
            )
        for name in arms:
            if name != "full":
                print(f"  {name:22s} time vs full at {L}: {results[(name, L)]['total_s'] / results[('full', L)]['total_s']:.2f}")
    full = analytic_time(1.0)
    print("analytic Qwen2.5-VL-7B, A100 bf16, n=8, 512-token answers, 32 questions per batch (per question):")
    for k, n_r in ((1.0, 1), (0.77, 1), (0.5, 1), (0.25, 1), (0.5, 4)):
        t = analytic_time(k, n_r=n_r)
        print(
            f"  k={k:<4} n_r={n_r}: vit {t['vit'] * 1e3:6.1f} ms  prefill {t['prefill'] * 1e3:6.1f} ms  "
            f"decode {t['decode'] * 1e3:7.1f} ms  total {t['total'] * 1e3:7.1f} ms  ratio {t['total'] / full['total']:.3f}"
        )
    L = max(lengths)
    pr, fu = results[("pruned k=0.77", L)], results[("full", L)]
    prompt_ratio = pr["mean_prompt"] / fu["mean_prompt"]  # per sequence: what each answer attends to
    print(f"analytic_time_ratio_7b={analytic_time(0.77)['total'] / full['total']:.3f} (k=0.77, n_r=1)")
    print(f"keep_ratio=0.77 prompt_token_ratio={prompt_ratio:.3f} time_ratio={pr['total_s'] / fu['total_s']:.3f}")


if __name__ == "__main__":
    main()
