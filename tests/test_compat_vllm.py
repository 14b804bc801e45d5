"""The vLLM hooks of ``vitos_verl.compat.vllm_0_24``: each upstream symbol pinned by its parameter
names and, where the hook depends on the body, a hash of its source, as ``tests/test_compat.py``
pins verl's. Import only (no engine): an upgrade fails here, naming the hook to review.

If vLLM cannot be imported at all, every test here fails naming the pin (there is no skip).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect

import pytest

from vitos_verl.compat import vllm_0_24

_P = "vllm.multimodal.processing.processor"
_Q = "vllm.model_executor.models.qwen2_5_vl"
_C = "vllm.multimodal.cache"

# (module, qualified name) -> (row of docs/upstream.md, parameter names, sha256 of
# inspect.getsource or None where only the interface matters) in vLLM 0.24.0
PINNED: dict[tuple[str, str], tuple[str, tuple[str, ...], str | None]] = {
    # L10: the engine's loop is its output handler's (started by _run_output_handler); the RPC's time limit
    ("vllm.v1.engine.async_llm", "AsyncLLM._run_output_handler"): (
        "L10",
        ("self",),
        "147195bf962def3e32032f15a9e1c33b0b94a985351ce5635e83ef3f7b1f4149",
    ),
    ("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc"): ("L10", ("self", "method", "timeout", "args", "kwargs"), None),
    # L1: the re-implemented method and the private calls the re-implementation makes
    (_P, "BaseMultiModalProcessor._cached_apply_hf_processor"): (
        "L1",
        ("self", "inputs", "timing_ctx"),
        "cedd77e66bf16f728df3c2881138a4e5a7999ed8e5986ccacbeb60939a59219b",
    ),
    (_P, "BaseMultiModalProcessor._get_hf_mm_data"): (
        "L1",
        ("self", "mm_items"),
        "208c1b07a9bfa2bddef11efe657e40e75d2c0a7421de0ec00bd032c623b7adfb",
    ),
    (_P, "BaseMultiModalProcessor._apply_hf_processor_text_only"): (
        "L1",
        ("self", "prompt_text", "tokenization_kwargs"),
        "d899598aa453cf2e8ce8096e7b3ef5111ec6947257deeeed2494fb2d9f827fb7",
    ),
    (_P, "BaseMultiModalProcessor._apply_hf_processor_tokens_only"): (
        "L1",
        ("self", "prompt_tokens"),
        "4ed4e20e4bc53a68ca0206859041a5337c1710ef30a1b1395da5617ae39647aa",
    ),
    (_P, "BaseMultiModalProcessor._apply_hf_processor_mm_only"): (
        "L1",
        ("self", "mm_items", "hf_processor_mm_kwargs", "tokenization_kwargs"),
        "587552eef0d9b7fc7dab77996e2b16f1dfc4fba09ce968c584e269dc4d00e528",
    ),
    (_P, "BaseMultiModalProcessor._get_mm_prompt_updates"): (
        "L1",
        ("self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
        "bd4292cbc86d2266bd6ee9e518e308aa2c437005c2b941c552da240231a8b6a8",
    ),
    (_P, "BaseMultiModalProcessor._merge_mm_kwargs"): (
        "L1",
        ("self", "cache", "mm_hashes", "mm_is_cached", "mm_missing_kwargs", "mm_missing_prompt_updates"),
        "e3c89ed36c71e3cf0266a7a8a9f216c897656f9199d7c4dc4923b761472e304f",
    ),
    (_P, "MultiModalProcessingInfo"): (
        "L1",
        ("kwargs", "hashes", "prompt_updates"),
        "d3625eda4c728a5344cc697647ad3c89867f428a623cb886de3ba408bacca13f",
    ),
    ("vllm.multimodal.processing.context", "TimingContext.record"): (
        "L1",
        ("self", "stage"),
        "d7442459341f3c9dd8fd93f7c7b40b0e7f26525fba7f1ac5b7a281d462990da3",
    ),
    # L3: the processor methods overridden through ProcessorHooks (super() is Qwen2.5-VL's)
    (_Q, "Qwen2_5_VLMultiModalProcessor._call_hf_processor"): (
        "L3",
        ("self", "prompt", "mm_data", "mm_kwargs", "tok_kwargs"),
        "f9fe1f32ca4d31e4f88beca807aaf8047c135b03c5425de3cc5c9c665f0ac539",
    ),
    (_Q, "Qwen2_5_VLMultiModalProcessor._get_mm_fields_config"): (
        "L3",
        ("self", "hf_inputs", "hf_processor_mm_kwargs"),
        "7fb79d1852e4614fd2aaa2dda01ed16a32a13de38c72f89f1fd6a8d09056e9c0",
    ),
    (_Q, "Qwen2_5_VLMultiModalProcessor._get_prompt_updates"): (
        "L3",
        ("self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
        "95ca286452dc2679e57c013e63a743c220f33b1b755d2fd16f59a8cf9081ff5c",
    ),
    (_Q, "Qwen2_5_VLProcessingInfo.get_hf_processor"): (
        "L3",
        ("self", "kwargs"),
        "f5f9f794306a765903fc566aa3c8b3fab1076c5bca54c890b150c3434fc58ca7",
    ),
    # L2: vLLM's item hash, the per-request uuids, the hasher
    ("vllm.multimodal.processing.inputs", "ProcessorInputs"): (
        "L2",
        ("prompt", "mm_data_items", "mm_uuid_items", "hf_processor_mm_kwargs", "tokenization_kwargs"),
        None,
    ),
    ("vllm.multimodal.processing.inputs", "ProcessorInputs.get_mm_hashes"): (
        "L2",
        ("self", "model_id"),
        "a0f4eaae26fed27923dcde6900cbaaccc7291aab8ce6101b4cfa7551909e93c4",
    ),
    ("vllm.renderers.base", "BaseRenderer._process_mm_uuids"): (
        "L2",
        ("self", "mm_data", "mm_data_items", "mm_uuid_items", "mm_req_id"),
        "5ea6332db01c74d5546dd0c0f1c6afff7d659d65443e4ad49e75d7987fbb6cbe",
    ),
    ("vllm.renderers.base", "BaseRenderer._process_multimodal"): (
        "L2",
        ("self", "prompt", "mm_data", "mm_uuids", "mm_processor_kwargs", "tokenization_kwargs", "skip_mm_cache"),
        "23f9dbabea6597235766b436a542e2e26f2c1e34888b191781743f9f93481366",
    ),
    ("vllm.multimodal.hasher", "MultiModalHasher.hash_kwargs"): (
        "L2",
        ("kwargs",),
        "f87410cdd737ff9aa1bd3534ac838fa5d05349c1636adf08c5d300b5e404debf",
    ),
    # L4: the processor caches
    (_P, "BaseMultiModalProcessor.__init__"): (
        "L4",
        ("self", "info", "dummy_inputs", "cache"),
        "7acc2a513ffeec8fa699383a078c61ea4a02922626a1b68ef93280fea985a257",
    ),
    ("vllm.multimodal.registry", "MultiModalRegistry.create_processor"): (
        "L4",
        ("self", "model_config", "tokenizer", "cache"),
        "6b816ebe6d6b0959d8ccc0f6240fac19199b61154a1a246fb2fe4be3c08bbb84",
    ),
    (_C, "BaseMultiModalProcessorCache.is_cached_item"): (
        "L4",
        ("self", "mm_hash"),
        "1efde592c8cac05fbaa90c2e4f15ec4e817b4ccbab68227eb8e754bfc59330ef",
    ),
    (_C, "BaseMultiModalProcessorCache.is_cached"): (
        "L4",
        ("self", "mm_hashes"),
        "d17f869fe5d6eaceaaaafcc4fe8025dfd8d55f29ff9c6fd88d4d87b4ace8809c",
    ),
    (_C, "MultiModalProcessorSenderCache.clear_cache"): (
        "L4",
        ("self",),
        "d1f23c1e777f09731bbd04c838db50e8d2ec8f3ede0cd14f32c9d10c6a957580",
    ),
    (_C, "ShmObjectStoreSenderCache.clear_cache"): (
        "L4",
        ("self",),
        "5288b959296aef1617bb133c93a2a6362f76f5657a7c730cb3c80c149c21f01c",
    ),
    # L5: the runners' resets (V1 runner, inherited by the CPU runner; V2 runner)
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.reset_encoder_cache"): (
        "L5",
        ("self",),
        "80c9aa86f73a8de897790f9edd600ae3ef8616ca3eefc27a498fc59d32196a96",
    ),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.reset_mm_cache"): (
        "L5",
        ("self",),
        "bb2b8f981149e1b46a2e5b9c0c5b8e03664d6d6b0b75e6dab0c4cd0564b9e684",
    ),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model"): ("L5", ("self",), None),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.reset_encoder_cache"): (
        "L5",
        ("self",),
        "364d01e6bb30448d3ca118670b2e19615e6253931d5b0d8c23acd9dc0d25feca",
    ),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.reset_mm_cache"): (
        "L5",
        ("self",),
        "62c1f26b41a97163fffc9e4ace5d2dc2fa3ec1affa3a1343afbe9578dcd5d47e",
    ),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.get_model"): ("L5", ("self",), None),
    # L6: the cache-type query
    ("vllm.multimodal.registry", "MultiModalRegistry._get_cache_type"): (
        "L6",
        ("self", "vllm_config"),
        "a06e750d5406d41639a3005c8fd429cd8742b6446ca7e6ca5ce56ac05bf01bf9",
    ),
    # L8: the front end's processor
    ("vllm.renderers.base", "BaseRenderer.get_mm_processor"): (
        "L8",
        ("self",),
        "14b9cae91433e7950b85d93f693bc563f5c2ee4c6098b4459d11ec6d040593d8",
    ),
    # L9: the CPU Linear dispatch and the call that uses what it sets
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"): (
        "L9",
        ("layer", "remove_weight"),
        "b6a587814634de21470e6694abae1d0790ce86ae08bb35e6e97eb988f26087d4",
    ),
    ("vllm.model_executor.layers.utils", "cpu_unquantized_gemm"): (
        "L9",
        ("layer", "x", "weight", "bias"),
        "f399bc57bd3ce882d114e3067546ef9d08a7a49c54c1ec3db9e13a04dff673f5",
    ),
}

# dataclass fields the hooks read: (module, class) -> {field: default or ... for "any"}
FIELDS = {
    ("vllm.config.compilation", "CompilationConfig"): {"cudagraph_mm_encoder": False},  # L7
    ("vllm.config.multimodal", "MultiModalConfig"): {  # L6: the fallback is vLLM's default
        "mm_processor_cache_gb": vllm_0_24.FALLBACK_PIXEL_BYTES / (1 << 30), "mm_processor_cache_type": ...},
}  # fmt: skip


def _import(module: str):
    try:
        import vllm

        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means the pin cannot be checked
        pytest.fail(
            f"vitos_verl.compat.vllm_0_24 is pinned to vLLM {vllm_0_24.VLLM_VERSION}; importing {module} failed: {e!r}"
        )
    assert vllm.__version__.startswith("0.24."), (
        f"vLLM {vllm.__version__} installed; vitos_verl.compat.vllm_0_24 is pinned to {vllm_0_24.VLLM_VERSION}"
    )
    return mod


def _resolve(module: str, name: str):
    obj = _import(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)  # our own wrappers (runner resets, CPU dispatch) set __wrapped__


def test_vllm_version_is_the_pinned_one():
    import vllm

    _import("vllm")
    assert vllm.__version__.split("+")[0] == vllm_0_24.VLLM_VERSION


@pytest.mark.parametrize("where", sorted(PINNED), ids=lambda w: f"{w[0]}:{w[1]}")
def test_upstream_vllm_symbols_are_the_pinned_ones(where):
    row, params, digest = PINNED[where]
    fn = _resolve(*where)
    review = f"{where[0]}:{where[1]} (docs/upstream.md {row}) changed since vLLM {vllm_0_24.VLLM_VERSION}; review vitos_verl.compat.vllm_0_24"
    got = tuple(inspect.signature(fn).parameters)
    if params:
        assert got == params, f"{review}: parameters {got}"
    if digest is not None:
        assert hashlib.sha256(inspect.getsource(fn).encode()).hexdigest() == digest, f"{review}: source"


@pytest.mark.parametrize("where", sorted(FIELDS), ids=lambda w: f"{w[0]}:{w[1]}")
def test_upstream_vllm_config_fields_are_the_pinned_ones(where):
    cls = _resolve(*where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, default in FIELDS[where].items():
        assert name in fields, (
            f"{where[1]}.{name} is gone; review vitos_verl.compat.vllm_0_24 (vLLM {vllm_0_24.VLLM_VERSION})"
        )
        if default is not ...:
            got = fields[name].default
            got = getattr(got, "default", got)  # pydantic Field(default=...)
            assert got == default, f"{where[1]}.{name} defaults to {got!r}, not {default!r}"


def test_runner_and_worker_classes_are_where_the_install_looks():
    """:func:`~vitos_verl.compat.vllm_0_24.install_runner_resets` finds the classes by module name
    (it patches only those already imported): they must be there, and the CPU runner a V1 runner,
    so that the V1 runner's patch reaches it."""
    v1 = _resolve("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
    assert issubclass(_resolve("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"), v1)
    assert inspect.isclass(_resolve("vllm.v1.worker.gpu_worker", "Worker"))


def test_processor_hooks_override_only_the_pinned_methods():
    """:class:`~vitos_verl.compat.vllm_0_24.ProcessorHooks` overrides vLLM's four private
    processor methods and nothing else of vLLM's: its public-named methods and helpers must not
    shadow an attribute that an upgrade adds to the processor class."""
    processor = _resolve(_Q, "Qwen2_5_VLMultiModalProcessor")
    ours = {name for name in vars(vllm_0_24.ProcessorHooks) if not name.startswith("__")}
    overridden = {name.split(".")[-1] for _, name in PINNED if name.startswith("Qwen2_5_VLMultiModalProcessor.")}
    overridden.add("_cached_apply_hf_processor")
    assert ours & set(dir(processor)) == overridden


def test_cache_type_fallback_is_narrow_and_logged(caplog):
    """A config vLLM's cache-type query cannot read (an ``AttributeError``, as after a rename)
    gives the named 4 GiB fallback with a warning; any other error propagates."""
    import types

    _import("vllm.multimodal")
    with caplog.at_level("WARNING", logger=vllm_0_24.__name__):
        assert vllm_0_24.sender_cache_bytes(types.SimpleNamespace()) == vllm_0_24.FALLBACK_PIXEL_BYTES == 4 << 30
    assert "fallback" in caplog.text and "4 GiB" in caplog.text

    class Broken:
        @property
        def model_config(self):
            raise RuntimeError("not a layout question")

    with pytest.raises(RuntimeError, match="not a layout question"):
        vllm_0_24.sender_cache_bytes(Broken())


def test_runner_resets_install_on_both_runners(monkeypatch):
    """:func:`~vitos_verl.compat.vllm_0_24.install_runner_resets` wraps the V1 and the V2 runner's
    resets (once: a second call changes nothing) and adds the RPC to vLLM's ``Worker``. Restored
    after the test."""
    runners = [
        _resolve(m, "GPUModelRunner") for m in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner")
    ]
    worker = _resolve("vllm.v1.worker.gpu_worker", "Worker")
    for cls in runners:
        for method in ("reset_encoder_cache", "reset_mm_cache"):
            monkeypatch.setattr(cls, method, inspect.unwrap(getattr(cls, method)))  # as vLLM ships it

    def rpc(worker):
        return "answer"

    monkeypatch.setattr(worker, "vitos_pin_test_rpc", None, raising=False)
    monkeypatch.delattr(worker, "vitos_pin_test_rpc")
    hooks = {"reset_encoder_cache": "clear_vit_cache", "reset_mm_cache": "clear_vit_pixels"}
    vllm_0_24.install_runner_resets(hooks, {"vitos_pin_test_rpc": rpc})
    installed = {(cls, m): getattr(cls, m) for cls in runners for m in hooks}
    vllm_0_24.install_runner_resets(hooks, {"vitos_pin_test_rpc": rpc})  # idempotent
    for (cls, method), fn in installed.items():
        assert getattr(cls, method) is fn and getattr(fn, "_vitos", False) and fn.__name__ == method
        assert inspect.unwrap(fn) is not fn
    assert worker.vitos_pin_test_rpc is rpc
