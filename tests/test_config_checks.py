"""Bad configs are refused before Ray starts, with the reason.

Each case composes the real smoke recipe with one hydra override, as a user would type it, and
runs the start-up check the entry point runs (no Ray). One case goes through
``DRY_RUN=1 launch/dualstream.sh`` to show the refusal reaches the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vitos_verl.trainer.main import check_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """An outputs dir holding (empty) the parquet files the smoke recipe reads."""
    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    for f in ("data/slake/train.parquet", "data/vqa_rad/train.parquet", "data/slake/val.parquet"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).touch()
    return tmp_path


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        cfg = compose(config_name="smoke_cpu", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def test_smoke_recipe_passes(outputs):
    check_config(_cfg())


REFUSED = [
    # item 2: values and combinations
    (["vitos.w_iou=nan"], r"vitos.w_iou=nan must be a finite number"),
    (["vitos.w_fb=inf"], r"vitos.w_fb=inf must be a finite number"),
    (["vitos.n_g=two"], r"vitos.n_g='two' must be an integer"),
    (["vitos.margin_cells=1.5"], r"vitos.margin_cells=1.5 must be an integer"),
    (["vitos.reward_timeout_s=0"], r"vitos.reward_timeout_s=0.0 must be > 0"),
    (["vitos.optim_steps.reasoning=0"], r"vitos.optim_steps.reasoning=0 must be a positive integer"),
    (["data.max_pixels=3000", "data.min_pixels=3136"], r"data.max_pixels=3000 must be >= 12544"),
    (["data.max_pixels=20000", "data.min_pixels=40000"], r"data.max_pixels=20000 < data.min_pixels=40000"),
    (["data.min_pixels=100"], r"data.min_pixels=100 must be >= 784"),
    (["data.max_response_length=0"], r"data.max_response_length=0 must be >= 1"),
    (["data.max_response_length=-5"], r"data.max_response_length=-5 must be >= 1"),
    (["data.max_pixels=lots"], r"data.max_pixels='lots' must be an integer"),
    (["actor_rollout_ref.actor.optim.lr=fast"], r"optim.lr='fast' must be a number"),
    (["data.train_batch_size=2.5"], r"data.train_batch_size=2.5 must be an integer"),
    (["trainer.save_freq=0"], r"trainer.save_freq=0 must be >= 1"),
    (["trainer.save_freq=-1"], r"trainer.save_freq=-1 must be >= 1"),
    (["trainer.total_training_steps=0"], r"trainer.total_training_steps=0 must be >= 1"),
    (["reward.custom_reward_function.reward_kwargs.w_iou=2.0"], r"reward_kwargs must equal the vitos block.*w_iou"),
    (["reward.custom_reward_function.reward_kwargs.max_pixels=1003520"], r"reward_kwargs must equal.*max_pixels"),
    (["+reward.custom_reward_function.reward_kwargs.w_other=1.0"], r"unknown keys: \['w_other'\]"),
    # item 3: verl options the ViToS loop does not honour
    (["algorithm.use_kl_in_reward=true"], r"algorithm.use_kl_in_reward=True: the KL penalty in the reward"),
    (["algorithm.rollout_correction.rollout_is=token"], r"rollout_is='token': rollout importance sampling"),
    (["algorithm.rollout_correction.rollout_rs=seq_mean_k1"], r"rollout_rs='seq_mean_k1'"),
    (["algorithm.rollout_correction.bypass_mode=true"], r"bypass_mode=True"),
    (["algorithm.filter_groups.enable=true"], r"filter_groups.enable=True: dynamic sampling"),
    (["algorithm.use_pf_ppo=true"], r"use_pf_ppo=True"),
    (["trainer.critic_warmup=2"], r"critic_warmup=2: GRPO has no critic"),
    (["trainer.log_val_generations=-1"], r"trainer.log_val_generations=-1 must be >= 0"),
    (["trainer.log_val_generations=some"], r"trainer.log_val_generations='some' must be an integer"),
    (["global_profiler.steps=[1,2]"], r"global_profiler.steps=\[1, 2\]: the profiler"),
    # one owner of the grounding budget: the dataset's follows vitos.grounding_max_pixels
    (["data.grounding_max_pixels=50176"], r"data.grounding_max_pixels=50176 differs from vitos.grounding_max_pixels=None"),
    (["vitos.grounding_max_pixels=50176", "data.grounding_max_pixels=25088"],
     r"data.grounding_max_pixels=25088 differs from vitos.grounding_max_pixels=50176"),
    (["vitos.grounding_max_pixels=313600"], r"grounding_max_pixels=313600 exceeds data.max_pixels=78400"),
    # data-parallel ranks: the smoke recipe on two ranks (verl's engine would assert inside a worker)
    (["trainer.nnodes=2"], r"rollout.log_prob_micro_batch_size_per_gpu=4 does not divide the grounding stream's 2 samples per rank"),
    (["trainer.nnodes=2", "data.train_batch_size=4"],
     r"ppo_micro_batch_size_per_gpu=4 does not divide the grounding update's 2 samples per rank and optimiser step"),
    (["trainer.n_gpus_per_node=3", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
      "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1"], r"grounding stream's 4 samples per step do not split over 3"),
    (["trainer.n_gpus_per_node=3", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
     r"3 GPUs is not a multiple of actor.ulysses_sequence_parallel_size=2"),
]


@pytest.mark.parametrize("overrides", [
    ["trainer.nnodes=2", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4"],  # make two-node
    ["trainer.nnodes=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
     "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
    ["trainer.nnodes=2", "actor_rollout_ref.actor.use_dynamic_bsz=true"],  # token-budget micro-batches: any split
])
def test_two_ranks_that_fit_pass(outputs, overrides):
    check_config(_cfg(*overrides))


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_with_reason(outputs, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(_cfg(*overrides))


@pytest.mark.parametrize("which", ["train", "val"])
def test_missing_data_file(outputs, which):
    victim = outputs / ("data/vqa_rad/train.parquet" if which == "train" else "data/slake/val.parquet")
    victim.unlink()
    with pytest.raises(ValueError, match=rf"data.{which}_files: missing \['{victim}'\].*data_prep"):
        check_config(_cfg())
    check_config(_cfg(), check_files=False)


def test_rollout_and_validation_dumps_are_honoured(outputs):
    """verl's rollout_data_dir, validation_data_dir and log_val_generations are implemented per
    stream (vitos_verl.trainer.rollout_dump), no longer refused; the smoke
    recipe sets them under its run folder."""
    cfg = _cfg("trainer.rollout_data_dir=/tmp/x", "trainer.validation_data_dir=/tmp/y", "trainer.log_val_generations=4")
    check_config(cfg)
    smoke = _cfg()
    run = Path(smoke.trainer.default_local_dir).parent
    assert Path(smoke.trainer.rollout_data_dir).parent == run == Path(smoke.trainer.validation_data_dir).parent
    assert smoke.trainer.log_val_generations > 0


def test_grounding_budget_is_set_through_vitos(outputs):
    """``vitos.grounding_max_pixels`` alone sets both readers: the dataset's ``data.grounding_max_pixels``
    follows it (vitos_trainer.yaml), and the check passes."""
    cfg = _cfg("vitos.grounding_max_pixels=50176")
    assert cfg.data.grounding_max_pixels == cfg.vitos.grounding_max_pixels == 50176
    check_config(cfg)


def test_integers_for_floats_are_fine(outputs):
    check_config(_cfg("vitos.w_iou=1", "vitos.w_keep=0"))


def test_dry_run_refuses_before_ray(outputs):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "VITOS_OUTPUTS": str(outputs)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "dualstream.sh"), "vitos.w_iou=nan"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "vitos.w_iou=nan must be a finite number" in out.stderr + out.stdout
    assert "Started a local Ray instance" not in out.stderr + out.stdout
