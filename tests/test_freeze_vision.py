"""``actor_rollout_ref.actor.freeze_vision_tower``: one real dual-stream step (``tests/_inprocess.py
freeze``: the ViToS actor worker on verl's FSDP engine, AdamW) leaves every vision-tower weight
where it was and moves the language model; without the key both move. With the vision weights
unchanged, the vLLM plugin keeps each image's ViT features across the weight sync
(``tests/test_vllm_weight_update.py::test_frozen_tower_sync_encodes_each_image_once``). fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitos_verl.platform import precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from data_prep import sparse_evidence

    out = tmp_path_factory.mktemp("sparse_evidence_freeze")
    sparse_evidence.generate(out, seed=2, n_train=8, n_val=4)
    return out


@pytest.fixture(scope="module")
def model(tiny_224_ckpt) -> Path:
    return tiny_224_ckpt


def _step(task: Path, model: Path, tmp_path: Path, freeze: bool) -> dict:
    out = tmp_path / "freeze.json"
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           precision.ENV: "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    overrides = ["data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "vitos.n_g=4", "vitos.n_r=1",
                 "actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
                 "actor_rollout_ref.actor.use_kl_loss=false", f"actor_rollout_ref.actor.freeze_vision_tower={freeze}"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tests" / "_inprocess.py"), "freeze", str(out), str(task), str(model), *overrides]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


def test_a_frozen_vision_tower_stays_and_the_rest_trains(task, model, tmp_path):
    frozen = _step(task, model, tmp_path, freeze=True)
    assert frozen["visual_params"] > 0 and not frozen["visual_requires_grad"]
    assert frozen["visual_max_change"] == 0.0, frozen
    assert frozen["other_max_change"] > 1e-4, frozen
    trained = _step(task, model, tmp_path, freeze=False)
    assert trained["visual_max_change"] > 1e-4 and trained["other_max_change"] > 1e-4, trained


def test_freezing_needs_a_vision_tower():
    import torch

    from vitos_verl.trainer.main import freeze_vision_tower

    with pytest.raises(ValueError, match="visual"):
        freeze_vision_tower(torch.nn.Linear(2, 2))
