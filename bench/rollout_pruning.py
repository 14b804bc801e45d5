"""What a ViToS rollout and a two-pass evaluation cost against vanilla GRPO / one pass, on fresh requests.

The cost model: docs/design.md section 1b; results: docs/measurements.md section 5. Every timed call starts where training stands after a weight sync: verl's
post-sync resets (prefix, multimodal and encoder caches: vLLM's processor cache, the plugin's
carriers, kept pixels and ViT features) and *new* keep masks, so no timing hits a cache that
training would not hit. Arms of ``--mode rollout`` (``Q`` questions on distinct real SLAKE test
images with ground-truth boxes; sampling at temperature 1, answers of ``--answer-tokens``, vLLM's
prefix caching on):

* ``vanilla``: the vanilla GRPO rollout, one full-token request per question with
  ``n = n_g * n_r`` samples (they share one prefill);
* ``grounding``: the grounding pass, one request per question with ``n = n_g`` samples of
  ``--grounding-tokens`` tokens (full tokens; it fills the ViT cache);
* ``reasoning``: ``n_g`` fresh keep masks per question (boxes around the GT box, jittered, grown to
  keep ratio ``--keep``) with ``n = n_r`` answers each, timed after an untimed grounding pass (as
  in training: the grounding pass precedes it);
* ``vitos``: the whole ViToS rollout, grounding then reasoning, timed together from the resets.

``reasoning_time_ratio = reasoning / vanilla`` and ``rollout_time_ratio = vitos / vanilla``
(medians over ``--repeats``). ``overhead_ms_per_request`` is the extra wall time of a pruned
request over an unpruned request of an already-seen image: ``R`` requests of each kind with
``max_tokens=1``, each with a unique nonce in its system prompt (no prefix-cache reuse), the pruned
ones with fresh masks that drop a single cell (``K = N - 1``: the same token work), after an
untimed grounding pass; ``(T_pruned - T_unpruned) / R``, median over repeats.

``--mode eval`` times evaluation, greedy, from reset caches: one pass (full tokens, the reasoning
prompt) against two passes (grounding, then reasoning on the tight GT-box mask, margin 1 cell),
and with ``--grounding-max-pixels`` two passes whose grounding pass sees a low-resolution copy
of the image (the reasoning pass keeps the full-resolution tokens; it is a new image for vLLM,
so its first pruned request carries the pixels). Its last line:
``mode=eval ... two_pass_ratio=<x> [two_pass_lowres_ratio=<y>] [two_pass_ratio_own_lengths=<z>]``: every
output has exactly ``--grounding-tokens`` / ``--answer-tokens`` tokens (equal lengths: the ratio of
prefill and per-token work), and with ``--own-lengths`` the same arms again with each output stopping
at its own end-of-sequence token (a trained checkpoint's real lengths: shorter answers show here). ``--mode both`` runs eval, then
rollout. The rollout mode's last line is exactly
``config=<n_g>x<n_r> keep_ratio=<k> overhead_ms_per_request=<x> reasoning_time_ratio=<y> rollout_time_ratio=<z>``.

Models: ``tiny`` / ``small`` (random, built by :mod:`vitos_verl.models.tiny`), ``7b-shape``
(Qwen2.5-VL-7B's config with vLLM's ``load_format="dummy"`` random weights: no download, a GPU
is needed), or a checkpoint path. ``--max-pixels`` sets the image budget (a copy of the
processor config; the checkpoint is untouched). CPU or GPU: whatever vLLM runs on. Timings on
shared machines are noisy: use ``--repeats`` and read the medians.

    python bench/rollout_pruning.py --questions 4                       # tiny model, CPU, minutes
    python bench/rollout_pruning.py --model 7b-shape --questions 32 --answer-tokens 512 --max-pixels 1003520
    python bench/rollout_pruning.py --mode eval --model 7b-shape --image-size 2048 --max-pixels 4194304 --grounding-max-pixels 1003520
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-VL-7B-Instruct's config.json (public), the fields that set the compute.
QWEN25_VL_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, tie_word_embeddings=False),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2),
}


# --------------------------------------------------------------------------- models
def _processor_files(out: Path, min_pixels: int, max_pixels: int) -> None:
    """Tokenizer, chat template and Qwen2.5-VL processor files (the tiny builder's), at a pixel budget."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from vitos_verl.models.tiny import CHAT_TEMPLATE, _tokenizer_dir

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    tok.chat_template = CHAT_TEMPLATE.read_text()
    tok.save_pretrained(out)
    ip = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, min_pixels=min_pixels, max_pixels=max_pixels)
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template).save_pretrained(out)


def seven_b_shape(out: Path, max_pixels: int) -> Path:
    """A weightless checkpoint folder with Qwen2.5-VL-7B's config (load it with ``load_format="dummy"``)."""
    from vitos_verl.models.tiny import TinySpec, build_config
    from vitos_verl.pruning import DEFAULT_MIN_PIXELS

    t, v = QWEN25_VL_7B["text"], QWEN25_VL_7B["vision"]
    spec = TinySpec(hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                    num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"], vision_depth=v["depth"],
                    vision_hidden_size=v["hidden_size"], vision_intermediate_size=v["intermediate_size"], vision_num_heads=v["num_heads"],
                    dtype="bfloat16", max_pixels=max_pixels)
    stamp = out / "vitos_7b_shape.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("max_pixels") == max_pixels:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(spec, vocab_size=t["vocab_size"])
    config.vision_config.fullatt_block_indexes = v["fullatt_block_indexes"]
    config.text_config.max_position_embeddings = t["max_position_embeddings"]
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    config.save_pretrained(out)
    _processor_files(out, DEFAULT_MIN_PIXELS, max_pixels)
    stamp.write_text(json.dumps({"max_pixels": max_pixels}) + "\n")
    return out


def with_max_pixels(path: Path, max_pixels: int) -> Path:
    """``path`` seen with another image budget: links to its files, rewritten processor configs
    (``preprocessor_config.json`` and/or transformers 5's ``processor_config.json``)."""
    rewrite = {"preprocessor_config.json", "processor_config.json"}
    out = ROOT / "outputs/models" / f"{path.name}-maxpix{max_pixels}"
    out.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name not in rewrite and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())

    def budget(ip: dict) -> dict:
        ip["max_pixels"] = max_pixels
        ip.setdefault("size", {})["longest_edge"] = max_pixels
        return ip

    for name in rewrite & {f.name for f in path.iterdir()}:
        cfg = json.loads((path / name).read_text())
        cfg = {**cfg, "image_processor": budget(cfg["image_processor"])} if "image_processor" in cfg else budget(cfg)
        (out / name).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def resolve_model(name: str, max_pixels: int | None) -> tuple[Path, str | None]:
    """``(checkpoint folder, load_format)`` for ``--model``."""
    from dataclasses import replace

    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint
    from vitos_verl.pruning import DEFAULT_MAX_PIXELS

    if name == "7b-shape":
        mp = max_pixels or DEFAULT_MAX_PIXELS
        return seven_b_shape(ROOT / "outputs/models" / f"7b-shape-qwen2.5-vl-maxpix{mp}", mp), "dummy"
    if name in SIZES:
        spec = SIZES[name] if max_pixels is None else replace(SIZES[name], max_pixels=max_pixels)
        suffix = "" if max_pixels is None else f"-maxpix{max_pixels}"
        return build_tiny_checkpoint(ROOT / "outputs/models" / f"{name}-qwen2.5-vl{suffix}", spec), None
    path = Path(name)
    return (path if max_pixels is None else with_max_pixels(path, max_pixels)), None


# --------------------------------------------------------------------------- questions and masks
def load_questions(parquet: Path, num: int, processor, image_size: int | None = None) -> list[dict]:
    """``num`` questions on distinct SLAKE test images that have GT boxes; with ``image_size``
    each image is resized (bicubic) to ``image_size x image_size`` original pixels and its box with it
    (the issue's 2048x2048 measurement: SLAKE's own images are about 512 px)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from vitos_verl.data.prompts import to_content_list
    from vitos_verl.pruning import KeepMask, box_to_resized, image_geometry

    ip = processor.image_processor
    out, seen = [], set()
    for row in pq.read_table(parquet).to_pylist():
        info, path = row["extra_info"], row["images"][0]["path"]
        if not info["gt_boxes"] or path in seen:
            continue
        seen.add(path)
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        gt = info["gt_boxes"]
        box = [min(b[0] for b in gt), min(b[1] for b in gt), max(b[2] for b in gt), max(b[3] for b in gt)]
        if image_size:
            sx, sy = image_size / image.size[0], image_size / image.size[1]
            image = image.resize((image_size, image_size), Image.BICUBIC)
            box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        geom = image_geometry(*image.size, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        out.append({
            "image": image,
            "box": box,
            "geom": geom,
            "grounding": to_content_list(row["prompt"]),
            "reasoning": to_content_list(row["reasoning_prompt"]),
            "tight": KeepMask.from_box(box_to_resized(box, geom), geom.cell_grid, margin_cells=1),
        })
        if len(out) == num:
            return out
    raise SystemExit(f"only {len(out)} SLAKE test images with boxes in {parquet}")


class Masks:
    """Fresh keep masks per image: never one handed out before in this run, while any is left."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used: dict[int, set[str]] = {}
        self.repeats = 0

    def jittered(self, q: dict, ratio: float, count: int) -> list:
        """``count`` distinct masks: the GT box jittered by up to two cells, grown to ``ratio``."""
        from vitos_verl.pruning import KeepMask, box_to_resized

        g = q["geom"]
        x1, y1, x2, y2 = box_to_resized(q["box"], g)
        used = self.used.setdefault(id(q), set())
        out, mine, tries = [], set(), 0
        while len(out) < count and tries < 200 * count:
            tries += 1
            dx, dy, grow = self.rng.uniform(-56, 56), self.rng.uniform(-56, 56), self.rng.uniform(0, 28)
            m = KeepMask.from_box([x1 + dx - grow, y1 + dy - grow, x2 + dx + grow, y2 + dy + grow], g.cell_grid, 0, ratio)
            key = m.encode()
            if key in mine or (key in used and tries < 100 * count):
                continue
            self.repeats += key in used
            mine.add(key)
            used.add(key)
            out.append(m)
        return out + out[: count - len(out)]  # a tiny grid may not have `count` distinct masks

    def drop_one(self, q: dict, count: int) -> list:
        """``count`` fresh masks keeping every cell but one (``K = N - 1``)."""
        import torch

        from vitos_verl.pruning import KeepMask

        rows, cols = q["geom"].cell_grid
        used = self.used.setdefault(id(q), set())
        out = []
        for cell in self.rng.sample(range(rows * cols), rows * cols):
            cells = torch.ones(rows, cols, dtype=torch.bool)
            cells.view(-1)[cell] = False
            m = KeepMask(cells)
            if m.encode() not in used:
                used.add(m.encode())
                out.append(m)
            if len(out) == count:
                break
        return out


# --------------------------------------------------------------------------- engine
class Bench:
    def __init__(self, a, model: Path, load_format: str | None):
        from transformers import AutoProcessor
        from vllm import LLM

        from vitos_verl.rollout.vllm_plugin import hf_overrides

        self.a = a
        self.processor = AutoProcessor.from_pretrained(model)
        kwargs = dict(
            model=str(model),
            hf_overrides=hf_overrides(),
            dtype=a.dtype,
            enable_prefix_caching=True,
            max_model_len=a.max_model_len,
            limit_mm_per_prompt={"image": 1},
            max_num_seqs=a.max_num_seqs,
            seed=a.seed,
            mm_processor_cache_gb=a.mm_cache_gb,
            enforce_eager=a.enforce_eager,
        )
        if load_format:
            kwargs["load_format"] = load_format
        if a.kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(a.kv_cache_gb * (1 << 30))
        if a.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = a.gpu_memory_utilization
        self.llm = LLM(**kwargs)

    def text(self, messages, nonce: str | None = None) -> str:
        if nonce is not None:
            messages = [{"role": "system", "content": [{"type": "text", "text": f"Request {nonce}."}]}, *messages]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def request(self, q: dict, stream: str, mask=None, image=None, nonce: str | None = None) -> dict:
        from vitos_verl.pruning import KEEP_KWARG

        r = {"prompt": self.text(q[stream], nonce), "multi_modal_data": {"image": image or q["image"]}}
        if mask is not None:
            r["mm_processor_kwargs"] = {KEEP_KWARG: mask.request_value()}
        return r

    def reset(self) -> None:
        """verl 0.9.1's post-sync ``clear_kv_cache``: prefix, multimodal and encoder caches."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def generate(self, requests: list[dict], n: int, max_tokens: int, greedy: bool = False,
                 own_lengths: bool = False) -> tuple[float, dict]:  # fmt: skip
        """Wall seconds of one ``LLM.generate`` call, and its requests, prompt tokens (once per
        request) and generated tokens (every sample). Every sample runs to ``max_tokens`` unless
        ``own_lengths`` (then it stops at its end-of-sequence token, ``max_tokens`` at most)."""
        from vllm import SamplingParams

        sp = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, ignore_eos=not own_lengths)
        t0 = time.perf_counter()
        outs = self.llm.generate(requests, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, {
            "requests": len(outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "generated": sum(len(c.token_ids) for o in outs for c in o.outputs),
        }

    def front_stats(self) -> dict:
        try:
            from vitos_verl.rollout.vllm_processor import front_end_stats

            return front_end_stats(self.llm)
        except (ImportError, AttributeError):  # a plugin without these counters
            return {}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _row(name: str, times: list[float], info: dict, base: float | None = None) -> str:
    ratio = f"{_median(times) / base:6.2f}" if base else "     -"
    spread = f"{min(times):7.2f}-{max(times):<7.2f}"
    return (f"{name:34s} {_median(times):8.2f} {spread:>15s} {ratio} {info.get('requests', 0):8d} "
            f"{info.get('prompt_tokens', 0):10d} {info.get('generated', 0):9d}")


HEADER = f"{'arm':34s} {'median_s':>8s} {'min-max_s':>15s} {'ratio':>6s} {'requests':>8s} {'prompt_tok':>10s} {'generated':>9s}"


# --------------------------------------------------------------------------- modes
def rollout_mode(b: Bench, qs: list[dict], masks: Masks) -> dict:
    a = b.a
    n_g, n_r, A, G = a.n_g, a.n_r, a.answer_tokens, a.grounding_tokens
    t = {k: [] for k in ("vanilla", "grounding", "reasoning", "vitos")}
    info: dict[str, dict] = {}
    keep = []
    front0 = b.front_stats()
    for rep in range(a.repeats):
        b.reset()
        dt, info["vanilla"] = b.generate([b.request(q, "reasoning") for q in qs], n_g * n_r, A)
        t["vanilla"].append(dt)

        b.reset()
        dt, info["grounding"] = b.generate([b.request(q, "grounding") for q in qs], n_g, G)
        t["grounding"].append(dt)
        reqs = []
        for q in qs:
            for m in masks.jittered(q, a.keep, n_g):
                keep.append(m.ratio)
                reqs.append(b.request(q, "reasoning", m))
        dt, info["reasoning"] = b.generate(reqs, n_r, A)
        t["reasoning"].append(dt)

        b.reset()
        reqs = [b.request(q, "reasoning", m) for q in qs for m in masks.jittered(q, a.keep, n_g)]
        t0 = time.perf_counter()
        _, gi = b.generate([b.request(q, "grounding") for q in qs], n_g, G)
        _, ri = b.generate(reqs, n_r, A)
        t["vitos"].append(time.perf_counter() - t0)
        info["vitos"] = {k: gi[k] + ri[k] for k in gi}
        print(f"  repeat {rep}: " + " ".join(f"{k}={v[-1]:.2f}s" for k, v in t.items()), flush=True)
    front = {k: v - front0.get(k, 0) for k, v in b.front_stats().items()}
    base = _median(t["vanilla"])
    print(f"rollout: {len(qs)} questions, n_g x n_r = {n_g}x{n_r}, keep {a.keep} (mean kept {statistics.mean(keep):.3f}), "
          f"answers {A} tokens, grounding {G} tokens, {a.repeats} repeats (medians), fresh masks (reused: {masks.repeats})")
    print(HEADER)
    print(_row(f"vanilla GRPO, n={n_g * n_r}", t["vanilla"], info["vanilla"]))
    print(_row(f"grounding pass, n={n_g}", t["grounding"], info["grounding"], base))
    print(_row(f"reasoning, {n_g} masks x {n_r} answers", t["reasoning"], info["reasoning"], base))
    print(_row("whole ViToS rollout (g + r)", t["vitos"], info["vitos"], base))
    if front:
        print(f"front end (all rollout calls): {front}")
    return {"keep": statistics.mean(keep), "reasoning_ratio": _median(t["reasoning"]) / base, "rollout_ratio": _median(t["vitos"]) / base}


def overhead(b: Bench, qs: list[dict], masks: Masks) -> float:
    """Extra ms per pruned request over an unpruned request of an already-seen image (see the module doc)."""
    a = b.a
    per_q = a.overhead_requests
    b.reset()
    b.generate([b.request(q, "reasoning") for q in qs], 1, 1)  # the images are seen: carriers, ViT features
    nonce = iter(range(10**9))
    diffs = []
    for rep in range(a.repeats + 1):
        unpruned = [b.request(q, "reasoning", nonce=f"u{rep}-{next(nonce)}") for q in qs for _ in range(per_q)]
        pruned = [b.request(q, "reasoning", m, nonce=f"p{rep}-{next(nonce)}") for q in qs for m in masks.drop_one(q, per_q)]
        order = [("u", unpruned), ("p", pruned)] if rep % 2 == 0 else [("p", pruned), ("u", unpruned)]
        got = {}
        for name, reqs in order:
            got[name] = b.generate(reqs, 1, 1)[0]
        if rep == 0:
            continue  # warm-up: first-call costs (kernels, allocations) are not the requests'
        diffs.append((got["p"] - got["u"]) / len(pruned) * 1e3)
        print(f"  overhead repeat {rep}: unpruned {got['u']:.3f}s pruned {got['p']:.3f}s for {len(pruned)} requests each: "
              f"{diffs[-1]:+.2f} ms/request", flush=True)
    return _median(diffs)


def eval_mode(b: Bench, qs: list[dict], own_lengths: bool = False) -> dict:
    """One pass against two passes, greedy, from reset caches. ``own_lengths``: each request stops
    at its own end-of-sequence token (the outputs' lengths are the model's; ``--answer-tokens`` and
    ``--grounding-tokens`` cap them), else every output has exactly those lengths."""
    from vitos_verl.pruning import smart_resize

    a = b.a
    A, G = a.answer_tokens, a.grounding_tokens
    gen = functools.partial(b.generate, greedy=True, own_lengths=own_lengths)
    t: dict[str, list[float]] = {"one": [], "two": []}
    info: dict[str, dict] = {}
    low = None
    if a.grounding_max_pixels:
        t["low"] = []
        ip = b.processor.image_processor
        low = []
        for q in qs:
            w, h = q["image"].size
            rh, rw = smart_resize(h, w, min_pixels=ip.size["shortest_edge"], max_pixels=a.grounding_max_pixels)
            low.append(q["image"].resize((rw, rh)))
    for rep in range(a.repeats):
        b.reset()
        dt, info["one"] = gen([b.request(q, "reasoning") for q in qs], 1, A)
        t["one"].append(dt)
        b.reset()
        t0 = time.perf_counter()
        _, gi = gen([b.request(q, "grounding") for q in qs], 1, G)
        _, ri = gen([b.request(q, "reasoning", q["tight"]) for q in qs], 1, A)
        t["two"].append(time.perf_counter() - t0)
        info["two"] = {k: gi[k] + ri[k] for k in gi}
        if low is not None:
            b.reset()
            t0 = time.perf_counter()
            _, gi = gen([b.request(q, "grounding", image=im) for q, im in zip(qs, low)], 1, G)
            _, ri = gen([b.request(q, "reasoning", q["tight"]) for q in qs], 1, A)
            t["low"].append(time.perf_counter() - t0)
            info["low"] = {k: gi[k] + ri[k] for k in gi}
        print(f"  repeat {rep}: " + " ".join(f"{k}={v[-1]:.2f}s" for k, v in t.items()), flush=True)
    keep = statistics.mean(q["tight"].ratio for q in qs)
    base = _median(t["one"])
    lengths = f"each output to its own end (at most: grounding {G}, answers {A} tokens)" if own_lengths else \
        f"grounding {G} tokens, answers {A} tokens"
    print(f"eval: {len(qs)} questions, greedy, {lengths}, tight GT box (mean keep {keep:.3f}), "
          f"{a.repeats} repeats (medians)")
    print(HEADER)
    print(_row("one pass (full tokens)", t["one"], info["one"]))
    print(_row("two passes (grounding + pruned)", t["two"], info["two"], base))
    res = {"keep": keep, "two_pass_ratio": _median(t["two"]) / base}
    if low is not None:
        print(_row(f"two passes, grounding at {a.grounding_max_pixels} px", t["low"], info["low"], base))
        res["two_pass_lowres_ratio"] = _median(t["low"]) / base
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | small | 7b-shape | path to a Qwen2.5-VL checkpoint")
    p.add_argument("--mode", default="rollout", choices=["rollout", "eval", "both"])
    p.add_argument("--data", type=Path, default=ROOT / "outputs/data/slake/test.parquet")
    p.add_argument("--questions", type=int, default=4, help="questions on distinct images")
    p.add_argument("--max-pixels", type=int, default=None, help="image budget of the processor (default: the model's)")
    p.add_argument("--grounding-max-pixels", type=int, default=None, help="eval: also time a low-resolution grounding pass")
    p.add_argument("--image-size", type=int, default=None, help="resize every image to SxS original pixels (e.g. 2048)")
    p.add_argument("--n-g", type=int, default=4, help="grounding samples (boxes) per question")
    p.add_argument("--n-r", type=int, default=2, help="answers per box")
    p.add_argument("--keep", type=float, default=0.77, help="keep ratio of the reasoning masks")
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--grounding-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--own-lengths", action="store_true",
                   help="eval: also time both arms with each output stopping at its own end-of-sequence token")
    p.add_argument("--overhead-requests", type=int, default=8, help="requests per question in each overhead arm")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mm-cache-gb", type=float, default=4.0, help="vLLM's mm_processor_cache_gb (0: no pixel-less items)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="kv_cache_memory_bytes in GiB (CPU: default 4)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.kv_cache_gb is None and not torch.cuda.is_available():
        a.kv_cache_gb = 4.0
    model, load_format = resolve_model(a.model, a.max_pixels)
    if not a.data.exists():
        raise SystemExit(f"{a.data} missing: run `make data` first")
    b = Bench(a, model, load_format)
    qs = load_questions(a.data, a.questions, b.processor, a.image_size)
    masks = Masks(a.seed)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model={a.model} ({model}) device={dev} questions={len(qs)} visual_tokens="
          f"{[q['geom'].num_tokens for q in qs]} prefix_caching=on mm_processor_cache_gb={a.mm_cache_gb}")
    b.reset()  # warm-up (kernels, allocations): untimed
    b.generate([b.request(qs[0], "reasoning"), b.request(qs[0], "reasoning", qs[0]["tight"])], 2, 2)

    if a.mode in ("eval", "both"):
        ev = eval_mode(b, qs)
        line = f"mode=eval questions={len(qs)} keep_ratio={ev['keep']:.3f} two_pass_ratio={ev['two_pass_ratio']:.3f}"
        if "two_pass_lowres_ratio" in ev:
            line += f" two_pass_lowres_ratio={ev['two_pass_lowres_ratio']:.3f}"
        if a.own_lengths:  # the same arms with the model's own output lengths
            own = eval_mode(b, qs, own_lengths=True)
            line += f" two_pass_ratio_own_lengths={own['two_pass_ratio']:.3f}"
        print(line, flush=True)
    if a.mode in ("rollout", "both"):
        ro = rollout_mode(b, qs, masks)
        ms = overhead(b, qs, masks)
        print(f"config={a.n_g}x{a.n_r} keep_ratio={a.keep} overhead_ms_per_request={ms:.2f} "
              f"reasoning_time_ratio={ro['reasoning_ratio']:.3f} rollout_time_ratio={ro['rollout_ratio']:.3f}")


if __name__ == "__main__":
    main()
