"""Hooks into torch 2.11.0 (``torch==2.11.0`` in pyproject.toml; rows P1 to P3 of docs/upstream.md).

Every place this package replaces a torch function or calls a private one goes through this
module; ``tests/test_compat.py`` pins each symbol (signature, and the private helpers' existence).
Used by the CPU platform plugin (:mod:`vitos_verl.platform.cpu`) and the CPU precision probe
(:mod:`vitos_verl.platform.precision`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

TORCH_VERSION = "2.11.0"


def install_pin_memory_noop() -> bool:
    """Make ``torch.Tensor.pin_memory`` return the tensor itself when CUDA is unavailable
    (idempotent; P1). Returns whether the no-op is installed.

    Pinned host memory only matters for copies to an accelerator; verl 0.9.1's FSDP2 reference
    model always uses ``CPUOffloadPolicy(pin_memory=True)``, which raises "Found no NVIDIA
    driver" on a machine without one.
    """
    import torch

    if torch.cuda.is_available():
        return False
    if not getattr(torch.Tensor.pin_memory, "_vitos_noop", False):

        def pin_memory(self, *args, **kwargs):
            return self

        pin_memory._vitos_noop = True
        torch.Tensor.pin_memory = pin_memory
    return True


def wrap_init_process_group(fix_backend: Callable[[str | None], str | None]) -> None:
    """Wrap ``torch.distributed.init_process_group`` so its ``backend`` (keyword or first
    positional argument) goes through ``fix_backend`` first (idempotent; P2)."""
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_vitos_dedupe", False):
        return
    orig = dist.init_process_group

    @functools.wraps(orig)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = fix_backend(kwargs["backend"])
        elif args:
            args = (fix_backend(args[0]), *args[1:])
        return orig(*args, **kwargs)

    init_process_group._vitos_dedupe = True
    dist.init_process_group = init_process_group


def cpu_reports_native_bf16() -> bool | None:
    """torch's own answer to "does this CPU compute bf16 natively": ``_is_avx512_bf16_supported()
    or _is_amx_tile_supported()`` (private in torch 2.11.0, ``torch/cpu/__init__.py``; the checks
    vLLM 0.24.0's ``CpuPlatform.import_kernels`` uses); ``None`` when torch or the helpers are
    missing (P3)."""
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        return None
