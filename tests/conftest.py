"""Shared fixtures: the real data in ../shared/data, a tiny checkpoint, prepared parquet.

Nothing here reaches a model hub; caches live under the repo's ``outputs/`` (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(os.environ.get("VITOS_DATA", ROOT.parent / "shared" / "data")).resolve()
CACHE = ROOT / "outputs" / "test-cache"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real data missing: {path} (set VITOS_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def slake_dir(data_dir) -> Path:
    return _need(data_dir / "slake")


@pytest.fixture(scope="session")
def vqa_rad_dir(data_dir) -> Path:
    return _need(data_dir / "vqa_rad")


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    from vitos_verl.models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(CACHE / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_224_ckpt() -> Path:
    """The tiny policy at the controlled task's pixel budget (224 x 224 px: 8 x 8 visual tokens,
    ``recipes/learn_cpu.yaml``'s ``data.max_pixels``)."""
    from dataclasses import replace

    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint

    return build_tiny_checkpoint(CACHE / "tiny-qwen2.5-vl-224px", replace(SIZES["tiny"], max_pixels=50176))


@pytest.fixture(scope="session")
def tiny_processor(tiny_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def slake_test_parquet(slake_dir, tmp_path_factory) -> Path:
    """The full SLAKE test split converted once per session."""
    from data_prep import slake

    out = tmp_path_factory.mktemp("slake")
    slake.main(["--src", str(slake_dir), "--out", str(out), "--splits", "test"])
    return out / "test.parquet"


@pytest.fixture(scope="session")
def slake_dataset(slake_test_parquet, tiny_processor, tmp_path_factory):
    """Factory: ``slake_dataset(max_pixels)`` is :class:`~vitos_verl.data.dataset.ViToSDataset`
    (verl's RLHF dataset as the trainer configures it) over the real SLAKE test split at that
    pixel budget, built once per budget."""
    from omegaconf import OmegaConf

    from vitos_verl.data.dataset import ViToSDataset

    built = {}

    def make(max_pixels: int):
        if max_pixels not in built:
            cfg = OmegaConf.create(
                {"prompt_key": "prompt", "image_key": "images", "max_prompt_length": 4096,
                 "filter_overlong_prompts": False, "cache_dir": str(tmp_path_factory.mktemp("verl-cache")),
                 "max_pixels": max_pixels}
            )
            built[max_pixels] = ViToSDataset(str(slake_test_parquet), tiny_processor.tokenizer, cfg, tiny_processor)
        return built[max_pixels]

    return make
