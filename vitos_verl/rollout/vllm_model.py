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

What a pruned request costs on the way in (hashes, pixel-less items, carriers) is the front
end's: :mod:`vitos_verl.rollout.vllm_processor`.

Freshness: the ViT cache never outlives the vision weights it was computed with, and outlives
everything else. The cache remembers a fingerprint of the vision tower's weights
(:func:`vision_fingerprint`); a ``load_weights`` call that names a vision weight (verl's weight
sync streams the policy in through it in chunks) compares the tower's weights with it at once, and
any other ``load_weights`` call or ``reset_encoder_cache`` of the model runner (vLLM's
``reload_weights``, whose kernel-format branch bypasses ``load_weights``; verl's post-sync
``clear_kv_cache``, hybrid sleep and request aborts) has them compared before the cache's next use.
Changed weights empty the cache (``vit_cache_clears``); unchanged ones keep it
(``vit_cache_kept``): with a frozen vision tower each image's features are computed once per run.
The features stay on the device while the rollout sleeps (at most ``VITOS_VIT_CACHE_MB``). With
LoRA every ``reset_encoder_cache`` empties the cache (adapter weights are not in the check).
``reset_mm_cache`` (verl's post-sync ``clear_kv_cache`` too) empties vLLM's processor caches,
this front end's carrier map and the model's kept pixels together.

Counters a trainer can log: :func:`vit_cache_stats` (model side, the ViT-cache hit rate) and
:func:`front_end_stats` (requests sent pixel-less / with pixels / served by vLLM's cache).

Select it without touching the checkpoint:
``LLM(model, hf_overrides={"architectures": [ARCH]})`` once the plugin is registered
(``vllm.general_plugins`` entry point of this package, :mod:`vitos_verl.rollout.vllm_plugin`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from vitos_verl.compat import vllm_0_24
from vitos_verl.pruning import IMAGE_KEY_FIELD, KEEP_FIELD, MERGE_SIZE, KeepMask, cell_grid_of, mrope_position_ids
from vitos_verl.rollout.lru import BoundedLRU, tensor_bytes
from vitos_verl.rollout.vllm_processor import ViToSMultiModalProcessor, ViToSProcessingInfo

ARCH = "ViToSQwen2_5_VLForConditionalGeneration"
VIT_CACHE_ITEMS = int(os.environ.get("VITOS_VIT_CACHE_ITEMS", "256"))
VIT_CACHE_BYTES = int(float(os.environ.get("VITOS_VIT_CACHE_MB", "1024")) * (1 << 20))
#: Distinct images whose pruned items a worker remembers for ``vit_cache_stats()["images"]``
#: (the most recent ones; enough for one step's questions on one replica).
SEEN_IMAGES = int(os.environ.get("VITOS_SEEN_IMAGES", "4096"))
RPC_STATS = "vitos_vit_cache_stats"  # worker method name for collective_rpc (see _patch_runner_resets)


def _patch_runner_resets() -> None:
    """Make the model runner's cache resets also empty this model's caches (idempotent).

    vLLM 0.24.0 resets a model runner's encoder cache (``GPUModelRunner.reset_encoder_cache``,
    ``vllm/v1/worker/gpu_model_runner.py``, inherited by the CPU runner, and the V2 runner's in
    ``vllm/v1/worker/gpu/model_runner.py``) wherever encoder outputs may be stale: at the end of
    ``reload_weights`` (whose kernel-format branch copies weights without ``load_weights``) and
    from ``EngineCore.reset_encoder_cache``, which verl 0.9.1 calls after every weight sync
    (``vLLMHttpServer.clear_kv_cache`` in ``vllm_async_server.py``), after a hybrid sleep and when
    it aborts requests: wrapped, it also marks the ViT cache for a check of the vision weights
    before its next use (``on_encoder_cache_reset``; with LoRA it empties the cache at once), which
    covers weight changes that bypass ``load_weights``. ``GPUModelRunner.reset_mm_cache`` (reached from
    ``EngineCore.reset_mm_cache``, i.e. ``LLM.reset_mm_cache`` / verl's ``clear_kv_cache``, when
    vLLM's processor caches are emptied) also drops the kept pixels (``clear_vit_pixels``): the
    front end forgets its carriers at the same moment. Patches the runner classes already
    imported (the one building this model is), no others. Also gives vLLM's ``Worker``
    (``vllm/v1/worker/gpu_worker.py``, the CPU worker's base) a method :data:`RPC_STATS`, so an
    engine's ``collective_rpc("vitos_vit_cache_stats")`` returns :func:`vit_cache_stats` per worker.
    The patching is :func:`vitos_verl.compat.vllm_0_24.install_runner_resets`.
    """
    vllm_0_24.install_runner_resets(
        {"reset_encoder_cache": "on_encoder_cache_reset", "reset_mm_cache": "clear_vit_pixels"},
        {RPC_STATS: worker_vit_cache_stats},  # collective_rpc by name: no pickled callable
    )


def vit_cache_stats(model) -> dict[str, float | dict[str, int]]:
    """ViT-cache counters of one model instance (cumulative), for a trainer's metrics.

    ``hits`` (image items served from cached features), ``misses`` (ViT passes, one per image
    encoded), ``recomputes`` (of those, pixel-less items re-encoded from kept pixels, e.g. after a
    weight update), ``pixelless`` (items that arrived without pixels), ``clears`` (ViT-cache
    invalidations), ``hit_rate`` = hits / (hits + misses) (0.0 before any image), ``images``
    (``{image key hex: pruned items served}``, cumulative, for the :data:`SEEN_IMAGES` most recently
    served images: which images this engine served, e.g. to check that a question's requests
    stayed on one replica). Use
    ``llm.apply_model(vit_cache_stats)`` in-process, or ``collective_rpc("vitos_vit_cache_stats")``
    on any engine (verl's ``vLLMHttpServer`` engine: ``await server.engine.collective_rpc(...)``,
    one dict per worker; a method name, so no ``VLLM_ALLOW_INSECURE_SERIALIZATION``).
    """
    hits, misses = int(getattr(model, "vit_cache_hits", 0)), int(getattr(model, "vit_cache_misses", 0))
    seen = getattr(model, "_vit_seen", None)
    return {
        "hits": hits,
        "misses": misses,
        "recomputes": int(getattr(model, "vit_cache_recomputes", 0)),
        "pixelless": int(getattr(model, "vit_pixelless_items", 0)),
        "clears": int(getattr(model, "vit_cache_clears", 0)),
        "kept": int(getattr(model, "vit_cache_kept", 0)),
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "images": {k.hex(): n for k, n in seen.items()} if seen is not None else {},
    }


def worker_vit_cache_stats(worker) -> dict[str, float | dict[str, int]]:
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


def vision_fingerprint(visual: torch.nn.Module) -> torch.Tensor:
    """A float64 ``(2 * n_params,)`` CPU tensor that changes when any vision-tower weight does: per
    parameter (sorted by name), the sum of its values and their sum weighted by ``(i mod 251) + 1``
    (``i``: the flat index), both in float64 on the parameter's device. Two weight sets with equal
    fingerprints differ only by a change that leaves both sums of every parameter unchanged."""
    out = []
    for _, p in sorted(visual.named_parameters(), key=lambda kv: kv[0]):
        v = p.detach().reshape(-1).double()
        w = torch.arange(v.numel(), device=v.device).remainder_(251).add_(1).double()
        out += [v.sum(), (v * w).sum()]
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


@MULTIMODAL_REGISTRY.register_processor(
    ViToSMultiModalProcessor, info=ViToSProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class ViToSQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image items may be pruned to the cells of a keep mask.

    ViT cache knobs, per instance: ``vit_cache_max_items`` / ``vit_cache_max_bytes`` (its LRU
    bounds, from ``VITOS_VIT_CACHE_ITEMS`` / ``VITOS_VIT_CACHE_MB``), ``vit_pixels_max_bytes``
    (the kept pixels' LRU bound); counters ``vit_cache_hits``, ``vit_cache_misses`` (images
    encoded), ``vit_cache_recomputes``, ``vit_pixelless_items``, ``vit_cache_clears``,
    ``vit_cache_kept`` (checks after a weight sync or reset that found the vision weights unchanged)
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
        self._vit_cache: BoundedLRU[bytes, torch.Tensor] = BoundedLRU(VIT_CACHE_ITEMS, VIT_CACHE_BYTES, tensor_bytes)
        # CPU, the ViT's dtype
        self._vit_pixels: BoundedLRU[bytes, torch.Tensor] = BoundedLRU(
            None, _default_pixel_bytes(vllm_config), tensor_bytes
        )
        self._vit_seen: BoundedLRU[bytes, int] = BoundedLRU(SEEN_IMAGES)  # image key -> pruned items served
        self.vit_cache_hits = 0
        self.vit_cache_misses = 0
        self.vit_cache_recomputes = 0
        self.vit_pixelless_items = 0
        self.vit_cache_clears = 0
        self.vit_cache_kept = 0
        self._vit_fingerprint: torch.Tensor | None = None  # of the weights the cached features came from
        self._vit_verify = False  # check the vision weights before the cache's next use
        self._lora = getattr(vllm_config, "lora_config", None) is not None
        _patch_runner_resets()

    # -- the caches' bounds (attributes an engine's owner may set) ---------------------------
    @property
    def vit_cache_max_items(self) -> int | None:
        return self._vit_cache.max_items

    @vit_cache_max_items.setter
    def vit_cache_max_items(self, n: int | None) -> None:
        self._vit_cache.max_items = n

    @property
    def vit_cache_max_bytes(self) -> int | None:
        return self._vit_cache.max_bytes

    @vit_cache_max_bytes.setter
    def vit_cache_max_bytes(self, n: int | None) -> None:
        self._vit_cache.max_bytes = n

    @property
    def vit_pixels_max_bytes(self) -> int:
        return self._vit_pixels.max_bytes

    @vit_pixels_max_bytes.setter
    def vit_pixels_max_bytes(self, n: int) -> None:
        self._vit_pixels.max_bytes = n

    # -- weights: features computed with old weights never outlive them ---------------------
    def clear_vit_cache(self) -> None:
        """Drop every cached vision-encoder output (counted in ``vit_cache_clears``); kept pixels stay."""
        self._vit_cache.clear()
        self.vit_cache_clears += 1

    def clear_vit_pixels(self) -> None:
        """Drop the kept preprocessed pixels (with vLLM's ``reset_mm_cache``: the front end forgets
        its carriers at the same time, so no pixel-less item refers to them)."""
        self._vit_pixels.clear()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM 0.24.0's Qwen2.5-VL ``load_weights``, then the ViT cache's freshness check.

        ``weights``: ``(name, tensor)`` pairs in checkpoint naming (``model.visual.*``,
        ``visual.*``, ``model.language_model.*``, ...; any subset, any shape/dtype the parameter's
        loader accepts). verl 0.9.1's weight sync (``vLLMColocateWorkerExtension._update_weights``)
        calls it once per received bucket. A call that names a vision weight checks the vision
        tower's weights at once (:meth:`check_vision_weights`: the cache is emptied if any changed,
        kept if none did, e.g. a frozen tower re-sent); any other call marks the cache for that
        check before its next use; a failing call empties it. Returns the loaded vLLM parameter
        names (``set[str]``), like the parent; raises what the parent raises (unknown name, shape
        mismatch).
        """
        touched = []

        def watched():
            for name, tensor in weights:
                if "visual" in name:
                    touched.append(name)
                yield name, tensor

        try:
            loaded = super().load_weights(watched())
        except BaseException:
            self.clear_vit_cache()
            raise
        if touched:
            self.check_vision_weights()
        else:
            self._vit_verify = True
        return loaded

    def on_encoder_cache_reset(self) -> None:
        """vLLM reset its encoder cache (after a weight sync, a sleep, an abort): the vision weights
        are checked before the ViT cache's next use; with LoRA (adapters outside the weights the
        check reads) the cache is emptied now."""
        if self._lora:
            self.clear_vit_cache()
        else:
            self._vit_verify = True

    def check_vision_weights(self) -> bool:
        """Compare the vision tower's weights with those the cached features came from
        (:func:`vision_fingerprint`); empty the ViT cache if they differ. Returns whether the cache
        was kept (counted in ``vit_cache_kept``; an empty cache counts as neither). Call only
        while the weights are on the device (not during a sleep)."""
        self._vit_verify = False
        fp = vision_fingerprint(self.visual)
        same = self._vit_fingerprint is not None and torch.equal(fp, self._vit_fingerprint)
        self._vit_fingerprint = fp
        if not same:
            if len(self._vit_cache):
                self.clear_vit_cache()
            return False
        self.vit_cache_kept += bool(len(self._vit_cache))
        return True

    # -- vision: one ViT pass per image, whatever the mask ---------------------------------
    def _keep_pixels(self, key: bytes, pix: torch.Tensor) -> None:
        if self.vit_pixels_max_bytes <= 0:
            return
        if key in self._vit_pixels:
            self._vit_pixels[key]  # noqa: B018 (now the most recently used)
            return
        p = pix.detach().to("cpu", self.visual.dtype)
        p = p.clone() if p.data_ptr() == pix.data_ptr() else p  # own storage, not a view of the batch
        self._vit_pixels.put(key, p)

    def _full_image_embeds(
        self, pixel_values: torch.Tensor | None, grid: torch.Tensor, keys: torch.Tensor
    ) -> list[torch.Tensor]:
        """Full-image ViT features per item (``(cells, hidden)`` each), from the cache or computed.

        ``pixel_values``: the batch's patches ``(sum(t*h*w), C*T*P*P)``, or ``None`` for a batch of
        pixel-less items; ``grid``: ``(n, 3)`` long on CPU; ``keys``: ``(n, 16)`` uint8.

        Raises:
            RuntimeError: a pixel-less item whose image has neither cached features nor kept pixels.
        """
        if self._vit_verify or self._vit_fingerprint is None:
            self.check_vision_weights()
        kb = [bytes(k.to("cpu").tolist()) for k in keys]
        pix = pixel_values.split(grid.prod(-1).tolist()) if pixel_values is not None else None
        if pix is None:
            self.vit_pixelless_items += len(kb)
        first = {k: i for i, k in reversed(list(enumerate(kb)))}  # one ViT pass per distinct image in the batch
        for k in kb:
            self._vit_seen.put(k, self._vit_seen.get(k, 0) + 1)
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
                self.vit_cache_recomputes += len(missing)
            sub_grid = grid[missing]
            feats = self.visual(torch.cat(src).type(self.visual.dtype), grid_thw=sub_grid.tolist())
            sizes = (sub_grid.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
            for i, f in zip(missing, feats.split(sizes)):
                f = f.clone() if len(missing) > 1 else f  # own storage: eviction frees it
                self._vit_cache.put(kb[i], f, trim=False)
        out = [self._vit_cache[k] for k in kb]
        self._vit_cache.trim()  # least recently used first; this call's outputs are already held in ``out``
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
