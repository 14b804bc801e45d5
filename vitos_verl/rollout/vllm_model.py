"""Qwen2.5-VL with visual-token pruning for vLLM (out-of-tree model, vLLM 0.24.0).

A request asks for pruning through ``mm_processor_kwargs={"vitos_keep": "<rows>x<cols>:<hex>"}``
(:func:`vitos_verl.pruning.encode_keep_mask`; one image per pruned request). Then:

* the processor emits only the kept number ``K`` of ``<|image_pad|>`` tokens and attaches the
  mask (``vitos_keep_mask``) and a content key of the image (``vitos_image_key``) to the item;
* ``embed_multimodal`` takes the kept rows (raster order) of the *full-image* vision-encoder
  output. That output is cached in the model by image content and grid only, never by the
  box: the grounding pass fills it and every pruned request on the same image reuses it, so
  the ViT runs once per image whatever the box;
* ``get_mrope_input_positions`` gives kept tokens their original ``(t, h, w)`` and starts the
  text after the image where it would start without pruning
  (:func:`vitos_verl.pruning.mrope_position_ids`, the same function the actor uses).

vLLM keys its prefix and encoder caches by the image and ``mm_processor_kwargs``: requests
whose boxes select the same cells carry the same ``vitos_keep`` text and share one cached
prefix. No ``vitos_keep`` means no pruning: exactly the stock model.

The ViT cache is a bounded LRU (``VITOS_VIT_CACHE_ITEMS`` images, default 256, and
``VITOS_VIT_CACHE_MB`` MiB of features, default 1024) and never outlives the weights it was
computed with: every ``load_weights`` call empties it (verl's weight sync streams the policy in
through it in chunks), and so does every ``reset_encoder_cache`` of the model runner (vLLM's
``reload_weights``; verl's post-sync ``clear_kv_cache``, hybrid sleep and request aborts).

Select it without touching the checkpoint:
``LLM(model, hf_overrides={"architectures": [ARCH]})`` once the plugin is registered
(``vllm.general_plugins`` entry point of this package, :mod:`vitos_verl.rollout.vllm_plugin`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from vitos_verl.pruning import MERGE_SIZE, decode_keep_mask, mrope_position_ids

ARCH = "ViToSQwen2_5_VLForConditionalGeneration"
KEEP_KWARG = "vitos_keep"
MASK_FIELD = "vitos_keep_mask"
KEY_FIELD = "vitos_image_key"
VIT_CACHE_ITEMS = int(os.environ.get("VITOS_VIT_CACHE_ITEMS", "256"))
VIT_CACHE_BYTES = int(float(os.environ.get("VITOS_VIT_CACHE_MB", "1024")) * (1 << 20))


def _strip(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if not k.startswith("vitos_")}


def clear_vit_cache_on_encoder_reset() -> None:
    """Make vLLM's ``reset_encoder_cache`` also empty this model's ViT cache (idempotent).

    vLLM 0.24.0 resets a model runner's encoder cache (``GPUModelRunner.reset_encoder_cache``,
    ``vllm/v1/worker/gpu_model_runner.py``, inherited by the CPU runner, and the V2 runner's in
    ``vllm/v1/worker/gpu/model_runner.py``) wherever encoder outputs may be stale: at the end of
    ``reload_weights`` (whose kernel-format branch copies weights without ``load_weights``) and
    from ``EngineCore.reset_encoder_cache``, which verl 0.9.1 calls after every weight sync
    (``vLLMHttpServer.clear_kv_cache`` in ``vllm_async_server.py``), after a hybrid sleep and when
    it aborts requests. Wrapping it covers weight changes that bypass ``load_weights`` (a LoRA
    adapter on the tower, added by ``add_lora``) and frees the cache while the rollout sleeps.
    Patches the runner classes already imported (the one building this model is), no others.
    """
    for name in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
        runner_cls = getattr(sys.modules.get(name), "GPUModelRunner", None)
        if runner_cls is None or getattr(runner_cls.reset_encoder_cache, "_vitos", False):
            continue
        orig = runner_cls.reset_encoder_cache

        def reset_encoder_cache(self, _orig=orig) -> None:
            _orig(self)
            try:
                model = self.get_model()
            except (AttributeError, ValueError):  # no model loaded yet
                return
            clear = getattr(model, "clear_vit_cache", None)
            if clear is not None:
                clear()

        reset_encoder_cache._vitos = True
        runner_cls.reset_encoder_cache = reset_encoder_cache


def _image_key(pixel_values: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """16-byte content key of one image's preprocessed pixels and grid (uint8 ``(16,)``)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(int(v) for v in grid)).encode())
    h.update(pixel_values.detach().to(torch.float32).contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


class ViToSProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**_strip(kwargs))


class ViToSMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Emits ``K`` image tokens for a pruned image and attaches its keep mask and image key."""

    def _call_hf_processor(self, prompt, mm_data, mm_kwargs, tok_kwargs):
        out = super()._call_hf_processor(prompt, mm_data, _strip(mm_kwargs), tok_kwargs)
        grid = out.get("image_grid_thw")
        if grid is None or len(grid) == 0:
            return out
        cells = (grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
        spec = mm_kwargs.get(KEEP_KWARG)
        masks = [torch.ones(n, dtype=torch.bool) for n in cells]
        if spec is not None:
            if len(cells) != 1:
                raise ValueError(f"{KEEP_KWARG} prunes one image per request; this request has {len(cells)}")
            mask = decode_keep_mask(spec)
            rows, cols = int(grid[0][1]) // MERGE_SIZE, int(grid[0][2]) // MERGE_SIZE
            if tuple(mask.shape) != (rows, cols):
                raise ValueError(
                    f"keep mask grid {tuple(mask.shape)} != the processor's cell grid {(rows, cols)} for this image: "
                    "the client and vLLM resized the image differently (check min/max pixels)"
                )
            masks = [mask.flatten()]
        out[MASK_FIELD] = torch.cat(masks)
        pix = out["pixel_values"].split((grid.prod(-1)).tolist())
        out[KEY_FIELD] = torch.stack([_image_key(p, g.tolist()) for p, g in zip(pix, grid)])
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if MASK_FIELD in hf_inputs:
            grid = hf_inputs["image_grid_thw"]
            config[MASK_FIELD] = MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE))
            config[KEY_FIELD] = MultiModalFieldConfig.batched("image")
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, _strip(hf_processor_mm_kwargs), out_mm_kwargs))
        image_token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token]

        def kept(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            if MASK_FIELD in item:
                return [image_token] * int(item[MASK_FIELD].data.sum())
            grid = item["image_grid_thw"].data
            return [image_token] * (int(grid.prod()) // (MERGE_SIZE * MERGE_SIZE))

        return [
            PromptReplacement(modality="image", target=[image_token], replacement=kept)
            if u.modality == "image"
            else u
            for u in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    ViToSMultiModalProcessor, info=ViToSProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class ViToSQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image items may be pruned to the cells of a keep mask.

    ViT cache knobs, per instance: ``vit_cache_max_items`` / ``vit_cache_max_bytes`` (its LRU
    bounds, from ``VITOS_VIT_CACHE_ITEMS`` / ``VITOS_VIT_CACHE_MB``) and the counters
    ``vit_cache_hits``, ``vit_cache_misses`` (images encoded) and ``vit_cache_clears``.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vit_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._vit_cache_bytes = 0
        self.vit_cache_max_items = VIT_CACHE_ITEMS
        self.vit_cache_max_bytes = VIT_CACHE_BYTES
        self.vit_cache_hits = 0
        self.vit_cache_misses = 0
        self.vit_cache_clears = 0
        clear_vit_cache_on_encoder_reset()

    # -- weights: features computed with old weights never outlive them ---------------------
    def clear_vit_cache(self) -> None:
        """Drop every cached vision-encoder output (counted in ``vit_cache_clears``)."""
        self._vit_cache.clear()
        self._vit_cache_bytes = 0
        self.vit_cache_clears += 1

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

    # -- vision: one ViT pass per image, whatever the box --------------------------------
    def _full_image_embeds(self, pixel_values: torch.Tensor, grid: torch.Tensor, keys: torch.Tensor) -> list[torch.Tensor]:
        pix = pixel_values.split(grid.prod(-1).tolist())
        kb = [bytes(k.to("cpu").tolist()) for k in keys]
        first = {k: i for i, k in reversed(list(enumerate(kb)))}  # one ViT pass per distinct image in the batch
        missing = sorted(i for k, i in first.items() if k not in self._vit_cache)
        self.vit_cache_hits += len(kb) - len(missing)
        self.vit_cache_misses += len(missing)
        if missing:
            sub_grid = grid[missing]
            feats = self.visual(torch.cat([pix[i] for i in missing]), grid_thw=sub_grid.tolist())
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
        masks = kwargs.pop(MASK_FIELD, None)
        keys = kwargs.pop(KEY_FIELD, None)
        if masks is None or kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        grid = kwargs["image_grid_thw"]
        grid = torch.stack(list(grid)) if isinstance(grid, (list, tuple)) else grid
        pixel_values = kwargs["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        masks = torch.cat(list(masks)) if isinstance(masks, (list, tuple)) else masks
        keys = torch.stack(list(keys)) if isinstance(keys, (list, tuple)) else keys
        full = self._full_image_embeds(pixel_values.type(self.visual.dtype), grid.to("cpu").long(), keys)
        sizes = (grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
        images = tuple(f[m.to(f.device).bool()] for f, m in zip(full, masks.split(sizes)))
        video_kwargs = {k: v for k, v in kwargs.items() if "video" in k or k == "second_per_grid_ts"}
        videos = tuple(super().embed_multimodal(**video_kwargs)) if video_kwargs.get("pixel_values_videos") is not None else ()
        return images + videos

    # -- positions: original (t, h, w) for kept tokens --------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        if not feats or any(f.modality != "image" for f in feats):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        grids, masks = [], []
        for f in feats:
            g = f.data["image_grid_thw"].data
            grids.append(g.tolist())
            m = f.data[MASK_FIELD].data if MASK_FIELD in f.data else None
            masks.append(None if m is None else m.view(int(g[1]) // MERGE_SIZE, int(g[2]) // MERGE_SIZE).bool())
        pos = mrope_position_ids(torch.tensor(input_tokens), grids, self.config.image_token_id, masks)
        return pos, int(pos.max()) + 1 - len(input_tokens)
