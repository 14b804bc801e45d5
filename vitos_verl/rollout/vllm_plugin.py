"""vLLM general plugin: registers the pruning Qwen2.5-VL architecture.

Loaded by vLLM in every process through this package's ``vllm.general_plugins`` entry point
(pyproject.toml), so it also reaches the engine processes verl's async server spawns. The
model module is imported lazily by vLLM's registry (no vLLM model code at plugin load).
"""

from __future__ import annotations

ARCH = "ViToSQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Register :data:`ARCH` with vLLM's ``ModelRegistry`` (idempotent)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"vitos_verl.rollout.vllm_model:{ARCH}")


def hf_overrides() -> dict:
    """``hf_overrides`` that select the pruning model for any Qwen2.5-VL checkpoint."""
    return {"architectures": [ARCH]}
