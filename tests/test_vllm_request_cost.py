"""A pruned request costs what its tokens cost, fp32, CPU, real SLAKE images.

The plugin hashes each image once per request with vLLM's own item hash (no float-pixel hash),
runs the image processor once per image on this engine, and sends a pruned request on an image
whose pixels the engine holds as a pixel-less item (grid, mask, image key). These tests check that
this changes nothing in the outputs, that vLLM's identifiers stay per (image, mask), the fallback
for an image first seen pruned, freshness after a weight update, the error on a lost image, and
(loosely) the front-end time. The engine, transformers model, cases and helpers are those of
``test_vllm_parity.py`` (module-scoped fixtures: this module gets its own engine).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from tests import test_vllm_parity as parity
from tests.test_vllm_parity import IMAGE_PAD, PARITY_ATOL, _actor_logprobs, _request
from tests.test_vllm_weight_update import _linear_weights_in_place, _update_vision_weight  # noqa: F401 (fixture)
from vitos_verl.pruning import KeepMask, box_to_keep_mask

pytestmark = pytest.mark.vllm
llm, hf_model, cases = parity.llm, parity.hf_model, parity.cases  # the fixtures (module scope: this module's own)
FRESH_ATOL = 1e-4  # fp32, vLLM vs transformers after a weight update (1e-6 measured; stale features: 1e-2+)


# --------------------------------------------------------------------------- helpers
def _processor(llm):
    return llm.llm_engine.renderer.get_mm_processor()


def _front(llm) -> dict[str, int]:
    from vitos_verl.rollout.vllm_processor import front_end_stats

    return front_end_stats(llm)


def _model_stats(llm) -> dict[str, float]:
    from vitos_verl.rollout.vllm_model import vit_cache_stats

    return llm.apply_model(vit_cache_stats)[0]


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if k not in ("hit_rate", "images")}  # images: a map, not a count


def _fresh(case, salt: int):
    """The case on a copy of its image with one pixel changed: a new image for every cache."""
    image = case["image"].copy()
    image.putpixel((0, 0), (salt % 256, 7, 11))
    return {**case, "image": image}


def _masks(case, count: int) -> list[torch.Tensor]:
    """``count`` distinct keep masks on the case's cell grid: boxes around its GT mask, shifted."""
    rows, cols = case["mask"].shape
    out, seen = [], set()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            r = case["mask"].nonzero()
            r0, c0 = int(r[:, 0].min()) + dy, int(r[:, 1].min()) + dx
            box = [28 * max(c0, 0), 28 * max(r0, 0), 28 * min(c0 + 3, cols), 28 * min(r0 + 3, rows)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            m = box_to_keep_mask(box, (rows, cols))
            if KeepMask(m).encode() not in seen and bool(m.any()) and not bool(m.all()):
                seen.add(KeepMask(m).encode())
                out.append(m)
            if len(out) == count:
                return out
    raise AssertionError("not enough distinct masks")


def _sample(llm, requests, seed: int = 1, max_tokens: int = 8):
    from vllm import SamplingParams

    sp = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i, logprobs=0, ignore_eos=True) for i in range(len(requests))]
    outs = llm.generate(requests, sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((list(o.prompt_token_ids), list(c.token_ids), torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])))
    return res


def _reset_all(llm) -> None:
    """verl 0.9.1's post-sync ``clear_kv_cache``: prefix, multimodal and encoder caches."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


class _CountImages:
    """Counts the images the engine's HF image processor preprocesses (a wrapper on its class)."""

    def __init__(self, llm, monkeypatch):
        ip = _processor(llm).info.get_hf_processor().image_processor
        cls = type(ip)
        orig = cls.preprocess
        self.images = 0

        def preprocess(this, images, *args, **kwargs):
            self.images += len(images) if isinstance(images, (list, tuple)) else 1
            return orig(this, images, *args, **kwargs)

        monkeypatch.setattr(cls, "preprocess", preprocess)


# --------------------------------------------------------------------------- tests
def test_one_image_processing_per_image_and_identical_outputs(llm, hf_model, cases, monkeypatch):
    """Grounding + 4 pruned requests with different masks on one image: the image is preprocessed
    once, the pruned items go pixel-less, and their outputs are those of the processed path."""
    case = _fresh(cases[0], salt=1)
    masks = _masks(case, 4)
    count = _CountImages(llm, monkeypatch)
    f0, m0 = _front(llm), _model_stats(llm)
    _sample(llm, [_request(case, None)], max_tokens=2)  # the grounding pass: the carrier
    cheap = _sample(llm, [_request(case, m) for m in masks])
    front, model = _delta(_front(llm), f0), _delta(_model_stats(llm), m0)
    print(f"images preprocessed: {count.images}; front end {front}; model {model}")
    assert count.images == 1, "the image processor ran more than once for one image"
    assert front["pixelless"] == len(masks) and front["with_pixels"] == 1
    assert model["misses"] == 1 and model["pixelless"] == len(masks) and model["recomputes"] == 0

    # the same pruned requests through the processed path (pixels sent per request), from cold caches
    _reset_all(llm)
    monkeypatch.setenv("VITOS_PIXELLESS", "0")
    images0 = count.images
    processed = _sample(llm, [_request(case, m) for m in masks])
    monkeypatch.delenv("VITOS_PIXELLESS")
    assert count.images - images0 == len(masks)
    worst = 0.0
    for (ids_a, tok_a, lp_a), (ids_b, tok_b, lp_b), m in zip(cheap, processed, masks):
        assert ids_a == ids_b and ids_a.count(IMAGE_PAD) == int(m.sum())
        assert tok_a == tok_b
        worst = max(worst, float((lp_a - lp_b).abs().max()))
    print(f"pixel-less vs processed: max|dlogp| {worst:.2e}")
    assert worst <= PARITY_ATOL
    # and the transformers forward on the pruned prompt
    ids, tok, lp = cheap[0]
    actor = _actor_logprobs(hf_model, case["enc"], masks[0], tok)
    assert float((lp - actor).abs().max()) < 1e-3


def test_token_prompt_pixelless(llm, cases, tiny_processor):
    """verl's server path (token ids, each image-pad run collapsed to one token) with a pixel-less item:
    vLLM re-expands the pad to the current mask's K and the output is the text path's."""
    from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens
    from vllm.inputs import TokensPrompt

    from vitos_verl.rollout.pruned_inputs import prune_input_ids

    case = _fresh(cases[1], salt=9)
    mask = _masks(case, 1)[0]
    _sample(llm, [_request(case, None)], max_tokens=1)
    f0 = _front(llm)
    pruned_ids = prune_input_ids(case["enc"]["input_ids"][0], case["enc"]["image_grid_thw"], [mask], IMAGE_PAD)
    token_req = TokensPrompt(
        prompt_token_ids=qwen2_5_vl_dedup_image_tokens(pruned_ids.tolist(), tiny_processor),
        multi_modal_data={"image": case["image"]},
        mm_processor_kwargs={"vitos_keep": KeepMask(mask).encode()},
    )
    (ids_t, tok_t, lp_t), = _sample(llm, [token_req], seed=41)
    assert _delta(_front(llm), f0)["pixelless"] == 1
    (ids_s, tok_s, lp_s), = _sample(llm, [_request(case, mask)], seed=41)  # same item: vLLM's cache
    assert ids_t == ids_s == pruned_ids.tolist()
    assert tok_t == tok_s and float((lp_t - lp_s).abs().max()) <= PARITY_ATOL


def test_same_k_masks_keep_their_own_identifiers(llm, cases):
    """Two masks with the same K on one image: different vLLM hashes, prompts of K pads, different outputs;
    the same mask twice: one hash. An unpruned item keeps vLLM's stock hash."""
    from vllm.multimodal.processing.inputs import ProcessorInputs

    case = _fresh(cases[1], salt=2)
    rows, cols = case["mask"].shape
    a = torch.zeros(rows, cols, dtype=torch.bool)
    b = a.clone()
    a[1:4, 1:4] = True
    b[1:4, 2:5] = True
    assert int(a.sum()) == int(b.sum()) and not torch.equal(a, b)
    _sample(llm, [_request(case, None)], max_tokens=1)
    out_a, out_b = _sample(llm, [_request(case, a), _request(case, b)], seed=5)
    assert out_a[0].count(IMAGE_PAD) == out_b[0].count(IMAGE_PAD) == int(a.sum())
    assert float((out_a[2] - out_b[2]).abs().max()) > 1e-3 or out_a[1] != out_b[1]

    proc = _processor(llm)
    items = proc.info.parse_mm_data({"image": [case["image"]]})
    h_img = ProcessorInputs(case["text"], items).get_mm_hashes(proc.info.model_id)["image"][0]  # vLLM's stock hash
    ha, hb = proc._pruned_hash(h_img, KeepMask(a).encode()), proc._pruned_hash(h_img, KeepMask(b).encode())
    assert len({h_img, ha, hb}) == 3 and ha == proc._pruned_hash(h_img, KeepMask(a.clone()).encode())
    hashes, keys = proc._image_hashes(ProcessorInputs(case["text"], items, hf_processor_mm_kwargs={"vitos_keep": "x"}), {})
    assert hashes == keys == [h_img]  # the vitos_* kwargs never reach the image hash


def test_image_first_seen_pruned_falls_back_once(llm, hf_model, cases, monkeypatch):
    """No grounding pass before: the first pruned request carries the pixels, the next ones do not."""
    case = _fresh(cases[1], salt=3)
    masks = _masks(case, 3)
    count = _CountImages(llm, monkeypatch)
    f0 = _front(llm)
    first = _sample(llm, [_request(case, masks[0])], seed=11)
    rest = _sample(llm, [_request(case, m) for m in masks[1:]], seed=12)
    front = _delta(_front(llm), f0)
    assert count.images == 1
    assert front["with_pixels"] == 1 and front["pixelless"] == len(masks) - 1
    for (ids, tok, lp), m in zip(first + rest, masks):
        assert ids.count(IMAGE_PAD) == int(m.sum())
        assert float((lp - _actor_logprobs(hf_model, case["enc"], m, tok)).abs().max()) < 1e-3


def test_repeated_mask_is_served_by_vllms_cache(llm, cases):
    """The same (image, mask) again: vLLM's processor cache holds the item; nothing is rebuilt."""
    case = _fresh(cases[0], salt=4)
    mask = _masks(case, 1)[0]
    _sample(llm, [_request(case, None)], max_tokens=1)
    a = _sample(llm, [_request(case, mask)], seed=21)
    f0 = _front(llm)
    b = _sample(llm, [_request(case, mask)], seed=21)
    front = _delta(_front(llm), f0)
    assert front["cached"] == 1 and front["pixelless"] == 0 and front["with_pixels"] == 0
    assert a[0][0] == b[0][0] and a[0][1] == b[0][1]


def test_pixelless_request_after_load_weights_is_fresh(llm, hf_model, cases):
    """``load_weights`` alone (no cache reset): a pixel-less pruned request on a seen image recomputes
    the features from the kept pixels with the new weights; after verl's resets the carriers and kept
    pixels are gone and the next pruned request carries pixels again (its features come from the ViT
    cache, whose vision weights are unchanged since)."""
    case = _fresh(cases[0], salt=5)
    m1, m2, m3 = _masks(case, 3)
    _sample(llm, [_request(case, None)], max_tokens=1)
    _sample(llm, [_request(case, m1)], seed=31)
    _update_vision_weight(llm, hf_model, seed=7)
    f0, s0 = _front(llm), _model_stats(llm)
    (ids, tok, lp), = _sample(llm, [_request(case, m2)], seed=32)
    front, model = _delta(_front(llm), f0), _delta(_model_stats(llm), s0)
    assert front["pixelless"] == 1 and model["recomputes"] == 1 and model["misses"] == 1
    diff = float((lp - _actor_logprobs(hf_model, case["enc"], m2, tok)).abs().max())
    print(f"pixel-less after load_weights: max|dlogp| vs new weights {diff:.2e}")
    assert diff <= FRESH_ATOL

    _reset_all(llm)  # verl's post-sync clear_kv_cache
    assert len(_processor(llm)._carriers) == 0
    assert llm.apply_model(lambda m: (len(m._vit_pixels), m._vit_pixels.nbytes))[0] == (0, 0)
    # the ViT cache outlives the resets: its features are of the vision weights now loaded
    assert llm.apply_model(lambda m: len(m._vit_cache))[0] > 0
    f0, s0 = _front(llm), _model_stats(llm)
    (ids, tok, lp), = _sample(llm, [_request(case, m3)], seed=33)
    front, model = _delta(_front(llm), f0), _delta(_model_stats(llm), s0)
    assert front["with_pixels"] == 1 and front["pixelless"] == 0
    assert model["misses"] == 0 and model["hits"] == 1  # served from the ViT cache, checked fresh
    assert float((lp - _actor_logprobs(hf_model, case["enc"], m3, tok)).abs().max()) <= FRESH_ATOL


def test_pixelless_miss_is_an_error(llm):
    """A pixel-less item whose image the model holds neither as features nor as pixels: RuntimeError."""
    grid = torch.tensor([[1, 4, 4]])
    keys = torch.full((1, 16), 7, dtype=torch.uint8)

    def run(m):
        return m._full_image_embeds(None, grid, keys)

    with pytest.raises(RuntimeError, match="pixel-less"):
        llm.apply_model(run)


def test_no_pixelless_items_without_a_sender_cache(llm, cases):
    """With vLLM's processor cache off (``mm_processor_cache_gb: 0``) every pruned item carries pixels."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    proc = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config, tokenizer=llm.llm_engine.renderer.tokenizer, cache=None)
    case = _fresh(cases[1], salt=6)
    items = proc.info.parse_mm_data({"image": [case["image"]]})
    for kw in ({}, {"vitos_keep": KeepMask(_masks(case, 1)[0]).encode()}):
        out = proc.apply(ProcessorInputs(case["text"], items, hf_processor_mm_kwargs=kw), TimingContext(enabled=False))
        assert "pixel_values" in out["mm_kwargs"]["image"][0]
    assert proc.stats["pixelless"] == 0 and proc.stats["with_pixels"] == 2


def test_front_end_time_per_pruned_request(llm, cases):
    """Timed guard against blow-ups only: the front-end work of a pixel-less pruned request (hash, mask,
    item, prompt updates) on a standalone processor with a sender cache, median of 20 fresh masks."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache import MultiModalProcessorSenderCache
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    config = llm.llm_engine.model_config
    proc = MULTIMODAL_REGISTRY.create_processor(
        config, tokenizer=llm.llm_engine.renderer.tokenizer, cache=MultiModalProcessorSenderCache(config)
    )
    case = _fresh(cases[0], salt=8)
    items = proc.info.parse_mm_data({"image": [case["image"]]})

    def apply(kw):
        t0 = time.perf_counter()
        proc.apply(ProcessorInputs(case["text"], items, hf_processor_mm_kwargs=kw), TimingContext(enabled=False))
        return time.perf_counter() - t0

    t_full = apply({})
    rows, cols = case["mask"].shape
    times = []
    for i in range(20):  # all-but-one-cell masks: fresh, K = N - 1
        m = torch.ones(rows, cols, dtype=torch.bool)
        m.view(-1)[i] = False
        times.append(apply({"vitos_keep": KeepMask(m).encode()}))
    med = statistics.median(times)
    print(f"front end: first (processed) {t_full * 1e3:.1f} ms, pixel-less pruned median {med * 1e3:.2f} ms")
    assert proc.stats["pixelless"] == 20 and proc.stats["hf_calls"] == 1
    assert med < 0.05, f"pixel-less pruned request took {med * 1e3:.1f} ms in the front end"


def test_per_request_uuids_keep_a_content_key(llm, cases):
    """vLLM 0.24.0 replaces uuids by per-request ones when its processor cache and prefix caching are
    both off (the evaluation harness's engine): the item hash follows vLLM, the ViT key the content,
    so a question's grounding and reasoning passes still share one ViT pass."""
    from vllm.multimodal.processing.inputs import ProcessorInputs

    proc = _processor(llm)
    case = _fresh(cases[0], salt=10)
    items = proc.info.parse_mm_data({"image": [case["image"]]})
    content = ProcessorInputs(case["text"], items).get_mm_hashes(proc.info.model_id)["image"]
    for n in (1, 2):
        uuids = {"image": [f"renderer0-mm-{n}-image-0"]}
        h_img, key_src = proc._image_hashes(ProcessorInputs(case["text"], items, uuids), {})
        assert h_img == uuids["image"] and key_src == content
    client = {"image": ["my-image-7"]}  # a client's own uuid: vLLM's identity, ours too
    assert proc._image_hashes(ProcessorInputs(case["text"], items, client), {}) == (client["image"], client["image"])


def test_vllm_hooks_this_plugin_relies_on(llm):  # llm: the runner hooks are installed by the model
    """The vLLM 0.24.0 hooks of ``vitos_verl.compat.vllm_0_24`` are in place on a running engine:
    the runner patches are installed and the worker RPC answers. The upstream symbols themselves
    (parameter names, source hashes) are pinned without an engine in ``tests/test_compat_vllm.py``."""
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vitos_verl.compat import vllm_0_24

    assert vllm.__version__.startswith("0.24.")
    assert isinstance(_processor(llm), vllm_0_24.ProcessorHooks)
    assert getattr(GPUModelRunner.reset_encoder_cache, "_vitos", False) and getattr(GPUModelRunner.reset_mm_cache, "_vitos", False)
    (stats,) = llm.collective_rpc("vitos_vit_cache_stats")  # by name, as a trainer would on verl's engine
    assert stats == _model_stats(llm) and stats["hits"] > 0 and 0 < stats["hit_rate"] < 1
