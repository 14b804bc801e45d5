"""verl on the CPU platform: selected by VERL_PLATFORM=cpu through the package's verl.plugins entry point."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import os, torch
    import verl  # loads the verl.plugins entry points
    from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
    from verl.utils.distributed import initialize_global_process_group_ray
    print("device", get_device_name(), "backend", get_nccl_backend())
    initialize_global_process_group_ray(timeout_second=60)  # verl asks for "cpu:gloo,cpu:gloo"
    t = torch.ones(3)
    torch.distributed.all_reduce(t)
    print("all_reduce", t.tolist(), torch.distributed.get_backend())
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(env_extra: dict[str, str]) -> str:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_verl_runs_collectives_on_the_cpu_platform():
    out = _run({"VERL_PLATFORM": "cpu"})
    assert "device cpu backend gloo" in out
    assert "all_reduce [1.0, 1.0, 1.0] cpu:gloo" in out


def test_cpu_platform_is_never_auto_detected():
    from vitos_verl.platform.cpu import PlatformCPU

    assert PlatformCPU().is_platform_available(use_smi_check=True) is False
