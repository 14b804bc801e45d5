"""A CPU platform for verl 0.9.1 (development machines and CI have no accelerator).

verl has no CPU platform and falls back to 'nvidia'. This module registers one named
``cpu`` with verl's ``PlatformRegistry``; it is imported in every process through this
package's ``verl.plugins`` entry point (verl loads those at ``import verl``) and selected with
``VERL_PLATFORM=cpu``. Devices are CPU tensors, collectives use gloo, Ray still schedules
workers on the ``GPU`` resource (start Ray with fake GPUs: ``ray.init(num_gpus=N)``), memory
and profiler calls are no-ops (docs/design.md section 3).

:func:`install` (run on import when ``VERL_PLATFORM=cpu``) applies two torch shims (written
against torch 2.11.0, pyproject.toml; docs/upstream.md rows P1, P2), and only these: verl joins
process-group backends as ``"cpu:gloo,<device>:<backend>"``, which becomes
``"cpu:gloo,cpu:gloo"`` here and torch rejects the repeated device, so it wraps
``torch.distributed.init_process_group`` to drop the duplicate; and verl's FSDP2 reference model
asks for pinned host memory, which needs a CUDA driver, so without CUDA it makes
``Tensor.pin_memory`` a no-op. Importing the module (on every machine, whatever the platform)
also registers the OmegaConf resolvers the recipes use: ``${vitos_cpu_dtype:}``
(:mod:`vitos_verl.platform.precision`) and ``${vitos_attn:...}`` (:mod:`vitos_verl.platform.attention`).
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

from vitos_verl.compat import torch_2_11
from vitos_verl.platform.attention import register_resolver as register_attention_resolver
from vitos_verl.platform.precision import register_resolver

NAME = "cpu"


class CpuDeviceIndex(str):
    """What ``current_device()`` returns: ``"cpu"`` where verl passes it as a device
    (``module.to(device=get_device_id())``: an int would mean ``cuda:<i>``), and ``"0"`` when
    formatted into ``f"{get_device_name()}:{get_device_id()}"`` (giving ``"cpu:0"``).

    >>> idx = CpuDeviceIndex("cpu")
    >>> (str(torch.device(idx)), f"cpu:{idx}")
    ('cpu', 'cpu:0')
    """

    def __format__(self, spec: str) -> str:
        return format(0, spec)


class _CpuDeviceModule(ModuleType):
    """``torch.cpu`` plus the ``torch.cuda``-style calls verl makes on its device module
    (memory statistics, RNG state, IPC) as CPU equivalents or no-ops."""

    def __init__(self) -> None:
        super().__init__("vitos_verl.platform.cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


CPU_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform=NAME)
class PlatformCPU(PlatformBase):
    """verl platform whose device is the CPU (gloo collectives, fake Ray GPUs)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: only an explicit VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self) -> CpuDeviceIndex:  # type: ignore[override]
        return CpuDeviceIndex("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for the (fake) GPU resource

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def dedupe_backend(backend: str | None) -> str | None:
    """``"cpu:gloo,cpu:gloo"`` -> ``"cpu:gloo"``: keep the first backend per device.

    >>> dedupe_backend("cpu:gloo,cpu:gloo")
    'cpu:gloo'
    >>> dedupe_backend("cpu:gloo,cuda:nccl")
    'cpu:gloo,cuda:nccl'
    """
    if not backend or "," not in backend:
        return backend
    seen: dict[str, str] = {}
    for part in backend.split(","):
        device = part.split(":", 1)[0] if ":" in part else part
        seen.setdefault(device, part)
    return ",".join(seen.values())


def install() -> None:
    """Wrap ``torch.distributed.init_process_group`` to dedupe backends, and make
    ``Tensor.pin_memory`` a no-op without CUDA (idempotent).

    Pinned host memory only matters for copies to an accelerator; verl's FSDP2 reference model
    always uses ``CPUOffloadPolicy(pin_memory=True)``, which raises "Found no NVIDIA driver"
    on a machine without one.
    """
    torch_2_11.install_pin_memory_noop()
    torch_2_11.wrap_init_process_group(dedupe_backend)


# The CPU recipes' ``${vitos_cpu_dtype:}`` and the GPU recipes' ``${vitos_attn:...}``
# (vitos_verl.platform.attention) must resolve in every verl entry point (the SFT trainer too),
# and this module is what verl imports from this package at ``import verl``, on every machine.
register_resolver()
register_attention_resolver()

if os.environ.get("VERL_PLATFORM", "").strip().lower() == NAME:
    install()
