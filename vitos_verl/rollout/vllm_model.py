"""Qwen2.5-VL with visual-token pruning for vLLM (out-of-tree model, vLLM 0.24.0).

A request asks for pruning through ``mm_processor_kwargs={"vitos_keep": "<rows>x<cols>:<hex>"}``
(:class:`vitos_verl.pruning.KeepMask`; one image per pruned request; ``""`` is the unpruned
request). Then:

* the processor emits only the kept number ``K`` of ``<|image_pad|>`` tokens and attaches the
  mask (``vitos_keep_mask``) and the image's content key (``vitos_image_key``) to the item;
* ``embed_multimodal`` takes the kept rows (raster order) of the *full-image* vision-encoder
  output, cached in the model by image key only (never by the mask): the grounding pass fills
  it and every pruned request on the same image reuses it, so the ViT runs once per image;
* ``get_mrope_input_positions`` gives kept tokens their original ``(t, h, w)`` and starts the
  text after the image where it would start without pruning
  (:func:`vitos_verl.pruning.mrope_position_ids`, the same function the actor uses).

No ``vitos_keep`` means no pruning: the stock model, with vLLM's own item hash.

What a pruned request costs (docs/design.md sections 1d and 6)
--------------------------------------------------------------
The front end (``ViToSMultiModalProcessor._cached_apply_hf_processor``) works per request with
two hashes, both vLLM's hasher (blake3 by default, ``VLLM_MM_HASHER_ALGORITHM``):

* ``h_img``: vLLM's item hash of the image *without* the ``vitos_*`` kwargs (the raw PIL pixels,
  or the client's ``multi_modal_uuids`` entry instead of them). An unpruned item's vLLM hash is
  ``h_img``, exactly the stock one. The 16-byte ViT-cache key is derived from it.
* a pruned item's vLLM hash is ``hash(h_img, vitos_keep)``: vLLM's identifier stays per
  (image, mask), so two masks never share encoder-cache rows or prefix-cache blocks, and two
  requests with the same mask share both.

What is sent for a pruned item that vLLM's processor cache does not already hold:

* **pixel-less** (the cheap path): when the image's pixels are known to be on this engine, i.e.
  a *carrier* item of the image (the unpruned item ``h_img``, or the first pruned item that
  carried pixels) is still in vLLM's *sender* cache (``mm_processor_cache_type`` ``lru`` or
  ``shm``, whose contents mirror the engine's): an item of ``image_grid_thw``, the mask (one
  bool per cell) and the image key, 0.4-1.3 KB at 324-1,225 visual tokens instead of the pixels'
  1.5-23 MB. No image-processor call, no pixel transfer. The grid comes from the
  carrier (a small bounded map ``h_img -> (grid, carrier hash)``; env ``VITOS_CARRIERS``).
* **with pixels** (the fallback, and what vLLM does for every new item): the image processor runs
  and the pixels travel; this item becomes the image's carrier. Used for the first sight of an
  image on this engine, when the carrier left vLLM's cache, with ``mm_processor_cache_gb: 0`` or
  ``processor_only`` (several engines behind one front end: it cannot know which holds what),
  and always with ``VITOS_PIXELLESS=0``.

The pad count is always that of the current mask (vLLM's cache stores resolved prompt updates
per hash, and the hash is per mask). The model serves a pixel-less item from its ViT cache, or
recomputes the features from the image's preprocessed pixels that it keeps from the carrier
(after a weight update; a bounded LRU, ``VITOS_PIXEL_CACHE_MB``, default the engine's
``mm_processor_cache_gb`` in the ViT's dtype, so at least as many images as vLLM's cache counts
in float32 pixels); holding neither is a :class:`RuntimeError` naming the image, never silent
wrong rows (it stops the engine: raise ``VITOS_PIXEL_CACHE_MB`` or set ``VITOS_PIXELLESS=0``).

Freshness: the ViT cache never outlives the weights it was computed with. Every
``load_weights`` call empties it (verl's weight sync streams the policy in through it in
chunks), and so does every ``reset_encoder_cache`` of the model runner (vLLM's
``reload_weights``; verl's post-sync ``clear_kv_cache``, hybrid sleep and request aborts).
``reset_mm_cache`` (verl's post-sync ``clear_kv_cache`` too) empties vLLM's processor caches,
this front end's carrier map and the model's kept pixels together.

Counters a trainer can log: :func:`vit_cache_stats` (model side, the ViT-cache hit rate) and
:func:`front_end_stats` (requests sent pixel-less / with pixels / served by vLLM's cache).

Select it without touching the checkpoint:
``LLM(model, hf_overrides={"architectures": [ARCH]})`` once the plugin is registered
(``vllm.general_plugins`` entry point of this package, :mod:`vitos_verl.rollout.vllm_plugin`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.processing import PromptReplacement

from vitos_verl.compat import vllm_0_24
from vitos_verl.pruning import (
    IMAGE_KEY_FIELD,
    KEEP_FIELD,
    KEEP_KWARG,
    MERGE_SIZE,
    KeepMask,
    cell_grid_of,
    mrope_position_ids,
)

ARCH = "ViToSQwen2_5_VLForConditionalGeneration"
KEY_BYTES = 16
VIT_CACHE_ITEMS = int(os.environ.get("VITOS_VIT_CACHE_ITEMS", "256"))
VIT_CACHE_BYTES = int(float(os.environ.get("VITOS_VIT_CACHE_MB", "1024")) * (1 << 20))
CARRIERS = int(os.environ.get("VITOS_CARRIERS", "65536"))
RPC_STATS = "vitos_vit_cache_stats"  # worker method name for collective_rpc (see _patch_runner_resets)


def _strip(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if not k.startswith("vitos_")}


def _pixelless_enabled() -> bool:
    return os.environ.get("VITOS_PIXELLESS", "1") != "0"


def image_key(h_img: str) -> torch.Tensor:
    """The ViT-cache key of an image: ``KEY_BYTES`` bytes (uint8 ``(16,)``) of its hash string.

    ``h_img`` is vLLM's item hash of the image (a hex digest) or a client uuid; this hashes that
    short string (blake2b, microseconds), never pixels.
    """
    return torch.frombuffer(bytearray(hashlib.blake2b(h_img.encode(), digest_size=KEY_BYTES).digest()), dtype=torch.uint8)


def _patch_runner_resets() -> None:
    """Make the model runner's cache resets also empty this model's caches (idempotent).

    vLLM 0.24.0 resets a model runner's encoder cache (``GPUModelRunner.reset_encoder_cache``,
    ``vllm/v1/worker/gpu_model_runner.py``, inherited by the CPU runner, and the V2 runner's in
    ``vllm/v1/worker/gpu/model_runner.py``) wherever encoder outputs may be stale: at the end of
    ``reload_weights`` (whose kernel-format branch copies weights without ``load_weights``) and
    from ``EngineCore.reset_encoder_cache``, which verl 0.9.1 calls after every weight sync
    (``vLLMHttpServer.clear_kv_cache`` in ``vllm_async_server.py``), after a hybrid sleep and when
    it aborts requests: wrapped, it also empties the ViT cache (``clear_vit_cache``), which covers
    weight changes that bypass ``load_weights`` (a LoRA adapter on the tower) and frees the
    features while the rollout sleeps. ``GPUModelRunner.reset_mm_cache`` (reached from
    ``EngineCore.reset_mm_cache``, i.e. ``LLM.reset_mm_cache`` / verl's ``clear_kv_cache``, when
    vLLM's processor caches are emptied) also drops the kept pixels (``clear_vit_pixels``): the
    front end forgets its carriers at the same moment. Patches the runner classes already
    imported (the one building this model is), no others. Also gives vLLM's ``Worker``
    (``vllm/v1/worker/gpu_worker.py``, the CPU worker's base) a method :data:`RPC_STATS`, so an
    engine's ``collective_rpc("vitos_vit_cache_stats")`` returns :func:`vit_cache_stats` per worker.
    The patching is :func:`vitos_verl.compat.vllm_0_24.install_runner_resets`.
    """
    vllm_0_24.install_runner_resets(
        {"reset_encoder_cache": "clear_vit_cache", "reset_mm_cache": "clear_vit_pixels"},
        {RPC_STATS: worker_vit_cache_stats},  # collective_rpc by name: no pickled callable
    )


clear_vit_cache_on_encoder_reset = _patch_runner_resets  # the name this module used before


class ViToSProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**_strip(kwargs))


class ViToSMultiModalProcessor(vllm_0_24.ProcessorHooks, Qwen2_5_VLMultiModalProcessor):
    """Emits ``K`` image tokens for a pruned image; sends a pruned item without pixels when it can.

    vLLM's private processor methods reach this class through
    :class:`vitos_verl.compat.vllm_0_24.ProcessorHooks` (``cached_apply``, ``call_hf_processor``,
    ``fields_config``, ``prompt_updates``), and so do its calls into vLLM's private ones.

    Counters (``front_end_stats``): ``requests`` (image requests through this path),
    ``pruned``, ``pixelless`` (pruned items sent without pixels), ``with_pixels`` (items whose
    image the image processor ran on: unpruned new items and the pruned fallback),
    ``cached`` (items vLLM's processor cache already held), ``hf_calls`` (image-processor calls).
    """

    def __init__(self, info, dummy_inputs, *, cache=None) -> None:
        """vLLM 0.24.0's constructor (``MultiModalRegistry.create_processor`` builds one per cache,
        ``vllm/multimodal/registry.py``), plus the carrier map. ``cache.clear_cache`` is wrapped to
        forget the carriers too: vLLM's ``reset_mm_cache`` reaches it through
        ``BaseRenderer.clear_mm_cache`` (``vllm/renderers/base.py``)."""
        super().__init__(info, dummy_inputs, cache=cache)
        self._carriers: OrderedDict[str, tuple[tuple[int, int, int], str]] = OrderedDict()
        self._carriers_lock = threading.Lock()
        self.stats = dict.fromkeys(("requests", "pruned", "pixelless", "with_pixels", "cached", "hf_calls"), 0)
        self._image_token: int | None = None
        if cache is not None:  # vLLM's reset_mm_cache empties the sender cache: forget the carriers too
            vllm_0_24.on_cache_clear(cache, self.clear_carriers)

    # -- the carrier map: which images have their pixels on this engine --------------------
    def clear_carriers(self) -> None:
        """Forget every carrier (called with vLLM's ``reset_mm_cache`` of this front end)."""
        with self._carriers_lock:
            self._carriers.clear()

    def _remember_carrier(self, h_img: str, grid: Sequence[int], carrier_hash: str) -> None:
        with self._carriers_lock:
            self._carriers[h_img] = (tuple(int(v) for v in grid), carrier_hash)
            self._carriers.move_to_end(h_img)
            while len(self._carriers) > CARRIERS:
                self._carriers.popitem(last=False)

    def _carrier_grid(self, h_img: str) -> tuple[int, int, int] | None:
        """The grid of ``h_img`` if its pixels are on this engine (its carrier is in the sender cache)."""
        cache = self.cache
        if not _pixelless_enabled() or not vllm_0_24.is_sender_cache(cache):
            return None
        with self._carriers_lock:
            entry = self._carriers.get(h_img)
        if entry is None:
            return None
        grid, carrier_hash = entry
        # does not touch the LRU order: the engine's receiver cache stays mirrored
        return grid if vllm_0_24.holds_item(cache, carrier_hash) else None

    # -- hashing -------------------------------------------------------------------------
    def _image_hashes(self, inputs, kwargs: Mapping[str, object]) -> tuple[list[str], list[str]]:
        """``(h_img, key_src)`` per image: vLLM's item hash without ``vitos_*`` kwargs, and what the
        ViT-cache key is derived from (``h_img``, except for the per-request uuids vLLM 0.24.0
        invents when both its caches are off: then the content hash, so the grounding and the
        reasoning pass of one image still share one ViT pass). ``inputs``: vLLM's ``ProcessorInputs``."""
        return self.image_hashes(inputs, kwargs)

    def _pruned_hash(self, h_img: str, spec: str) -> str:
        return self.hash_image_with(h_img, **{KEEP_KWARG: spec})

    # -- vLLM hooks (through vllm_0_24.ProcessorHooks) ----------------------------------------
    def call_hf_processor(self, prompt, mm_data, mm_kwargs, tok_kwargs):
        if mm_data.get("images"):
            self.stats["hf_calls"] += 1
        return super().call_hf_processor(prompt, mm_data, _strip(mm_kwargs), tok_kwargs)

    def fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super().fields_config(hf_inputs, hf_processor_mm_kwargs))
        if KEEP_FIELD in hf_inputs:
            grid = hf_inputs["image_grid_thw"]
            config[KEEP_FIELD] = MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE))
            config[IMAGE_KEY_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return config

    def prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super().prompt_updates(mm_items, _strip(hf_processor_mm_kwargs), out_mm_kwargs))
        if self._image_token is None:
            self._image_token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token]
        image_token = self._image_token

        def kept(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            if KEEP_FIELD in item:
                return [image_token] * int(item[KEEP_FIELD].data.sum())
            grid = item["image_grid_thw"].data
            return [image_token] * (int(grid.prod()) // (MERGE_SIZE * MERGE_SIZE))

        return [
            PromptReplacement(modality="image", target=[image_token], replacement=kept)
            if u.modality == "image"
            else u
            for u in updates
        ]

    def cached_apply(self, inputs, timing_ctx):
        """vLLM 0.24.0 ``BaseMultiModalProcessor._cached_apply_hf_processor``
        (``vllm/multimodal/processing/processor.py``) for image-only requests, hashing and
        processing each image once (see the module docstring). It reuses that file's
        ``_apply_hf_processor_text_only`` / ``_tokens_only`` / ``_mm_only``,
        ``_get_mm_prompt_updates`` and ``_merge_mm_kwargs`` (which stores new items in vLLM's
        processor cache and returns the cached ones' resolved prompt updates), and
        ``ProcessorInputs.get_mm_hashes`` (``vllm/multimodal/processing/inputs.py``) for ``h_img``,
        all through the helpers of :class:`vitos_verl.compat.vllm_0_24.ProcessorHooks`.

        Returns what the parent returns: the prompt's token ids before prompt updates (``list[int]``),
        the items / hashes / resolved prompt updates, and ``False`` (updates not applied yet).
        Requests with other modalities or image embeddings take the parent's path (they cannot be
        pruned). Items get ``vitos_keep_mask`` (bool, one entry per cell) and ``vitos_image_key``
        (uint8 ``(16,)``); a pixel-less item has no ``pixel_values``.

        Raises:
            ValueError: ``vitos_keep`` on a request with more than one image, with embeddings or
                another modality; a malformed mask; a mask whose grid is not the image's cell grid;
                a uuid-only image (no data) that neither vLLM's cache nor this engine holds.
        """
        items = inputs.mm_data_items
        spec = inputs.hf_processor_mm_kwargs.get(KEEP_KWARG) or None  # KEEP_ALL ("") is the unpruned request
        passthrough = self.passthrough_mm_data(items)
        counts = {m: c for m, c in items.get_all_counts().items() if c > 0}
        if passthrough or set(counts) != {"image"}:
            if spec is not None:
                raise ValueError(f"{KEEP_KWARG} prunes the pixels of exactly one image; this request has {counts or 'none'}"
                                 + (" given as embeddings" if passthrough else ""))
            return super().cached_apply(inputs, timing_ctx)
        n = counts["image"]
        if spec is not None and n != 1:
            raise ValueError(f"{KEEP_KWARG} prunes one image per request; this request has {n}")
        kwargs = _strip(inputs.hf_processor_mm_kwargs)
        self.stats["requests"] += 1
        self.stats["pruned"] += spec is not None

        with self.timed(timing_ctx, "get_mm_hashes"):
            h_img, key_src = self._image_hashes(inputs, kwargs)
            item_hashes = [self._pruned_hash(h_img[0], spec)] if spec is not None else list(h_img)

        cache = self.cache
        is_cached = vllm_0_24.cached_flags(cache, item_hashes) if cache is not None else [False] * n
        self.stats["cached"] += sum(is_cached)
        pixelless_grid = [None if is_cached[i] or spec is None else self._carrier_grid(h_img[i]) for i in range(n)]
        to_process = [i for i in range(n) if not is_cached[i] and pixelless_grid[i] is None]
        new = [i for i in range(n) if not is_cached[i]]
        mask = KeepMask.decode(spec) if spec is not None and new else None  # a cached item was checked already

        with self.timed(timing_ctx, "apply_hf_processor"):
            prompt_ids = self.prompt_token_ids(inputs)
            processed = None
            if to_process:
                data = [items["image"].get(i) for i in to_process]
                if any(d is None for d in data):
                    raise ValueError(
                        "an image given by uuid only (no data) is neither in vLLM's processor cache nor on this engine"
                    )
                processed = self.process_images(data, kwargs, inputs.tokenization_kwargs)
                self.stats["with_pixels"] += len(to_process)

        # the new items, in request order: processed ones (pixels) and pixel-less ones
        new_items, grids = {}, {}
        if processed is not None:
            grid = processed["image_grid_thw"]
            cells = (grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
            masks = [torch.ones(c, dtype=torch.bool) for c in cells]
            if mask is not None:
                mask.check_cell_grid(cell_grid_of(grid[0]))
                masks = [mask.flat()]
            processed[KEEP_FIELD] = torch.cat(masks)
            processed[IMAGE_KEY_FIELD] = torch.stack([image_key(key_src[i]) for i in to_process])
            built = MultiModalKwargsItems.from_hf_inputs(processed, self.fields_config(processed, kwargs))["image"]
            for j, i in enumerate(to_process):
                new_items[i], grids[i] = built[j], grid[j].tolist()
        for i in new:
            if i in new_items:
                continue
            grid = pixelless_grid[i]
            mask.check_cell_grid(cell_grid_of(grid))
            bf = BatchFeature({
                "image_grid_thw": torch.tensor([grid]),
                KEEP_FIELD: mask.flat(),
                IMAGE_KEY_FIELD: image_key(key_src[i]).unsqueeze(0),
            })
            new_items[i] = MultiModalKwargsItems.from_hf_inputs(bf, self.fields_config(bf, kwargs))["image"][0]
            self.stats["pixelless"] += 1
        new_kwargs = MultiModalKwargsItems({"image": [new_items[i] for i in new]} if new else {})
        new_updates = self.image_prompt_updates([items["image"].get(i) for i in new], kwargs, new_kwargs)

        if cache is None:
            mm_kwargs, mm_prompt_updates = new_kwargs, new_updates
        else:
            with self.timed(timing_ctx, "merge_mm_kwargs"):
                mm_kwargs, mm_prompt_updates = self.merge_with_cache(
                    cache, item_hashes, is_cached, new_kwargs, new_updates
                )
        for i in to_process:  # these items carried the pixels to the engine, under item_hashes[i]
            self._remember_carrier(h_img[i], grids[i], item_hashes[i])
        return self.processing_result(prompt_ids, mm_kwargs, item_hashes, mm_prompt_updates)


def front_end_stats(llm) -> dict[str, int]:
    """This package's front-end counters of a ``vllm.LLM`` (in-process processor; see
    :class:`ViToSMultiModalProcessor`): ``dict[str, int]``, cumulative since the engine started."""
    return dict(getattr(vllm_0_24.mm_processor_of(llm), "stats", {}))


def vit_cache_stats(model) -> dict[str, float]:
    """ViT-cache counters of one model instance (cumulative), for a trainer's metrics.

    ``hits`` (image items served from cached features), ``misses`` (ViT passes, one per image
    encoded), ``recomputes`` (of those, pixel-less items re-encoded from kept pixels, e.g. after a
    weight update), ``pixelless`` (items that arrived without pixels), ``clears`` (ViT-cache
    invalidations), ``hit_rate`` = hits / (hits + misses) (0.0 before any image). Use
    ``llm.apply_model(vit_cache_stats)`` in-process, or ``collective_rpc("vitos_vit_cache_stats")``
    on any engine (verl's ``vLLMHttpServer`` engine: ``await server.engine.collective_rpc(...)``,
    one dict per worker; a method name, so no ``VLLM_ALLOW_INSECURE_SERIALIZATION``).
    """
    hits, misses = int(getattr(model, "vit_cache_hits", 0)), int(getattr(model, "vit_cache_misses", 0))
    return {
        "hits": hits,
        "misses": misses,
        "recomputes": int(getattr(model, "vit_cache_recomputes", 0)),
        "pixelless": int(getattr(model, "vit_pixelless_items", 0)),
        "clears": int(getattr(model, "vit_cache_clears", 0)),
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
    }


def worker_vit_cache_stats(worker) -> dict[str, float]:
    """:func:`vit_cache_stats` of a vLLM worker's model (pass to ``collective_rpc``)."""
    return vit_cache_stats(worker.get_model())


def _default_pixel_bytes(vllm_config) -> int:
    """Bytes of preprocessed pixels the model keeps: ``VITOS_PIXEL_CACHE_MB``, else the engine's
    ``mm_processor_cache_gb`` when the front end can send pixel-less items (a sender cache), else 0
    (:func:`vitos_verl.compat.vllm_0_24.sender_cache_bytes`: if vLLM's cache-type query is gone,
    a logged warning and its 4 GiB fallback)."""
    env = os.environ.get("VITOS_PIXEL_CACHE_MB")
    if env is not None:
        return int(float(env) * (1 << 20))
    return vllm_0_24.sender_cache_bytes(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    ViToSMultiModalProcessor, info=ViToSProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class ViToSQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image items may be pruned to the cells of a keep mask.

    ViT cache knobs, per instance: ``vit_cache_max_items`` / ``vit_cache_max_bytes`` (its LRU
    bounds, from ``VITOS_VIT_CACHE_ITEMS`` / ``VITOS_VIT_CACHE_MB``), ``vit_pixels_max_bytes``
    (the kept pixels' LRU bound); counters ``vit_cache_hits``, ``vit_cache_misses`` (images
    encoded), ``vit_cache_recomputes``, ``vit_pixelless_items``, ``vit_cache_clears``
    (:func:`vit_cache_stats`).
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        """Raises ``ValueError`` with ``compilation_config.cudagraph_mm_encoder``: vLLM 0.24.0's
        encoder CUDA graphs (``GPUModelRunner._execute_mm_encoder``,
        ``vllm/v1/worker/gpu_model_runner.py``) run the ViT without ``embed_multimodal``, so
        pruned items would get every row of the image (and pixel-less ones none)."""
        if vllm_0_24.encoder_cudagraphs_on(vllm_config):
            raise ValueError(f"{ARCH} needs embed_multimodal: turn compilation_config.cudagraph_mm_encoder off")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vit_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._vit_cache_bytes = 0
        self._vit_pixels: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # CPU, the ViT's dtype
        self._vit_pixels_bytes = 0
        self.vit_cache_max_items = VIT_CACHE_ITEMS
        self.vit_cache_max_bytes = VIT_CACHE_BYTES
        self.vit_pixels_max_bytes = _default_pixel_bytes(vllm_config)
        self.vit_cache_hits = 0
        self.vit_cache_misses = 0
        self.vit_cache_recomputes = 0
        self.vit_pixelless_items = 0
        self.vit_cache_clears = 0
        _patch_runner_resets()

    # -- weights: features computed with old weights never outlive them ---------------------
    def clear_vit_cache(self) -> None:
        """Drop every cached vision-encoder output (counted in ``vit_cache_clears``); kept pixels stay."""
        self._vit_cache.clear()
        self._vit_cache_bytes = 0
        self.vit_cache_clears += 1

    def clear_vit_pixels(self) -> None:
        """Drop the kept preprocessed pixels (with vLLM's ``reset_mm_cache``: the front end forgets
        its carriers at the same time, so no pixel-less item refers to them)."""
        self._vit_pixels.clear()
        self._vit_pixels_bytes = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM 0.24.0's Qwen2.5-VL ``load_weights``, then empty the ViT cache.

        ``weights``: ``(name, tensor)`` pairs in checkpoint naming (``model.visual.*``,
        ``visual.*``, ``model.language_model.*``, ...; any subset, any shape/dtype the parameter's
        loader accepts). Any call invalidates the cache, a partial or failing one too: verl
        0.9.1's weight sync (``vLLMColocateWorkerExtension._update_weights``) calls it once per
        received bucket. Returns the loaded vLLM parameter names (``set[str]``), like the parent;
        raises what the parent raises (unknown name, shape mismatch).
        """
        try:
            return super().load_weights(weights)
        finally:
            self.clear_vit_cache()

    # -- vision: one ViT pass per image, whatever the mask ---------------------------------
    def _keep_pixels(self, key: bytes, pix: torch.Tensor) -> None:
        if self.vit_pixels_max_bytes <= 0:
            return
        if key in self._vit_pixels:
            self._vit_pixels.move_to_end(key)
            return
        p = pix.detach().to("cpu", self.visual.dtype)
        p = p.clone() if p.data_ptr() == pix.data_ptr() else p  # own storage, not a view of the batch
        self._vit_pixels[key] = p
        self._vit_pixels_bytes += p.numel() * p.element_size()
        while self._vit_pixels and self._vit_pixels_bytes > self.vit_pixels_max_bytes:
            _, old = self._vit_pixels.popitem(last=False)
            self._vit_pixels_bytes -= old.numel() * old.element_size()

    def _full_image_embeds(self, pixel_values: torch.Tensor | None, grid: torch.Tensor, keys: torch.Tensor) -> list[torch.Tensor]:
        """Full-image ViT features per item (``(cells, hidden)`` each), from the cache or computed.

        ``pixel_values``: the batch's patches ``(sum(t*h*w), C*T*P*P)``, or ``None`` for a batch of
        pixel-less items; ``grid``: ``(n, 3)`` long on CPU; ``keys``: ``(n, 16)`` uint8.

        Raises:
            RuntimeError: a pixel-less item whose image has neither cached features nor kept pixels.
        """
        kb = [bytes(k.to("cpu").tolist()) for k in keys]
        pix = pixel_values.split(grid.prod(-1).tolist()) if pixel_values is not None else None
        if pix is None:
            self.vit_pixelless_items += len(kb)
        first = {k: i for i, k in reversed(list(enumerate(kb)))}  # one ViT pass per distinct image in the batch
        if pix is not None:
            for k, i in first.items():
                self._keep_pixels(k, pix[i])
        missing = sorted(i for k, i in first.items() if k not in self._vit_cache)
        self.vit_cache_hits += len(kb) - len(missing)
        self.vit_cache_misses += len(missing)
        if missing:
            if pix is not None:
                src = [pix[i] for i in missing]
            else:
                lost = [kb[i].hex() for i in missing if kb[i] not in self._vit_pixels]
                if lost:
                    raise RuntimeError(
                        f"pixel-less pruned image item(s) {lost}: this engine holds neither the image's features nor its "
                        "pixels (evicted, or cleared without the front end's reset_mm_cache). Raise VITOS_PIXEL_CACHE_MB, "
                        "or set VITOS_PIXELLESS=0 to always send pixels"
                    )
                dev = next(self.visual.parameters()).device
                src = [self._vit_pixels[kb[i]].to(dev) for i in missing]
                for i in missing:
                    self._vit_pixels.move_to_end(kb[i])
                self.vit_cache_recomputes += len(missing)
            sub_grid = grid[missing]
            feats = self.visual(torch.cat(src).type(self.visual.dtype), grid_thw=sub_grid.tolist())
            sizes = (sub_grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
            for i, f in zip(missing, feats.split(sizes)):
                f = f.clone() if len(missing) > 1 else f  # own storage: eviction frees it
                self._vit_cache[kb[i]] = f
                self._vit_cache_bytes += f.numel() * f.element_size()
        out = []
        for k in kb:
            self._vit_cache.move_to_end(k)
            out.append(self._vit_cache[k])
        while self._vit_cache and (
            len(self._vit_cache) > self.vit_cache_max_items or self._vit_cache_bytes > self.vit_cache_max_bytes
        ):  # least recently used first; this call's outputs are already held in ``out``
            _, f = self._vit_cache.popitem(last=False)
            self._vit_cache_bytes -= f.numel() * f.element_size()
        return out

    def embed_multimodal(self, **kwargs: object):
        """Image items with a keep mask: the kept rows of the full image's (cached) ViT output, one
        ``(K, hidden)`` tensor per item; anything else: the parent's ``embed_multimodal``."""
        masks = kwargs.pop(KEEP_FIELD, None)
        keys = kwargs.pop(IMAGE_KEY_FIELD, None)
        if masks is None:
            return super().embed_multimodal(**kwargs)
        grid = kwargs["image_grid_thw"]
        grid = torch.stack(list(grid)) if isinstance(grid, (list, tuple)) else grid
        grid = grid.to("cpu").long()
        pixel_values = kwargs.get("pixel_values")
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        masks = torch.cat(list(masks)) if isinstance(masks, (list, tuple)) else masks
        keys = torch.stack(list(keys)) if isinstance(keys, (list, tuple)) else keys
        full = self._full_image_embeds(pixel_values, grid, keys)
        sizes = (grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
        return tuple(f[m.to(f.device).bool()] for f, m in zip(full, masks.split(sizes)))

    # -- positions: original (t, h, w) for kept tokens --------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        if not feats or any(f.modality != "image" for f in feats):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        grids, masks = [], []
        for f in feats:
            g = f.data["image_grid_thw"].data
            grids.append(g.tolist())
            m = f.data[KEEP_FIELD].data if KEEP_FIELD in f.data else None
            masks.append(None if m is None else KeepMask.from_flat(m, cell_grid_of(g)))
        pos = mrope_position_ids(torch.tensor(input_tokens), grids, self.config.image_token_id, masks)
        return pos, int(pos.max()) + 1 - len(input_tokens)
