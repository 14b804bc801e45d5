"""The front end of the pruning Qwen2.5-VL for vLLM 0.24.0: its multimodal processor.

A request asks for pruning through ``mm_processor_kwargs={"vitos_keep": "<rows>x<cols>:<hex>"}``
(:class:`vitos_verl.pruning.KeepMask`; one image per pruned request; ``""`` is the unpruned
request). :class:`ViToSMultiModalProcessor` emits only the kept number ``K`` of
``<|image_pad|>`` tokens and attaches the mask (``vitos_keep_mask``) and the image's content key
(``vitos_image_key``) to the item; the model side (:mod:`vitos_verl.rollout.vllm_model`) turns
them into the kept rows of the image's ViT features and their M-RoPE positions.

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

``reset_mm_cache`` (verl's post-sync ``clear_kv_cache``) empties vLLM's processor caches and this
front end's carrier map together (and the model's kept pixels).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.processing import PromptReplacement

from vitos_verl.compat import vllm_0_24
from vitos_verl.pruning import IMAGE_KEY_FIELD, KEEP_FIELD, KEEP_KWARG, MERGE_SIZE, KeepMask, cell_grid_of
from vitos_verl.rollout.lru import BoundedLRU

KEY_BYTES = 16
CARRIERS = int(os.environ.get("VITOS_CARRIERS", "65536"))


def _strip(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if not k.startswith("vitos_")}


def _pixelless_enabled() -> bool:
    return os.environ.get("VITOS_PIXELLESS", "1") != "0"


def image_key(h_img: str) -> torch.Tensor:
    """The ViT-cache key of an image: ``KEY_BYTES`` bytes (uint8 ``(16,)``) of its hash string.

    ``h_img`` is vLLM's item hash of the image (a hex digest) or a client uuid; this hashes that
    short string (blake2b, microseconds), never pixels.
    """
    return torch.frombuffer(
        bytearray(hashlib.blake2b(h_img.encode(), digest_size=KEY_BYTES).digest()), dtype=torch.uint8
    )


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
        self._carriers: BoundedLRU[str, tuple[tuple[int, int, int], str]] = BoundedLRU(max_items=CARRIERS)
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
            self._carriers.put(h_img, (tuple(int(v) for v in grid), carrier_hash))

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
            config[KEEP_FIELD] = MultiModalFieldConfig.flat_from_sizes(
                "image", grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)
            )
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
            PromptReplacement(modality="image", target=[image_token], replacement=kept) if u.modality == "image" else u
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
                raise ValueError(
                    f"{KEEP_KWARG} prunes the pixels of exactly one image; this request has {counts or 'none'}"
                    + (" given as embeddings" if passthrough else "")
                )
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
            bf = BatchFeature(
                {
                    "image_grid_thw": torch.tensor([grid]),
                    KEEP_FIELD: mask.flat(),
                    IMAGE_KEY_FIELD: image_key(key_src[i]).unsqueeze(0),
                }
            )
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
