"""Hydra entry point of the dual-stream trainer: ``python -m vitos_verl.trainer.main``.

The config is verl's ``ppo_trainer`` plus ``vitos_trainer.yaml`` (the ``vitos`` block and the
deltas ViToS needs); recipes under ``recipes/`` override only what differs::

    python -m vitos_verl.trainer.main --config-path $PWD/recipes --config-name smoke_cpu

It runs verl's legacy (``DataProto``) driver path, ``trainer.use_v1=false``: verl 0.9.1's v1
trainer moves batches through TransferQueue and has no place for a second, dependent rollout.
"""

from __future__ import annotations

import os
import socket

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.main_ppo import run_ppo
from verl.trainer.main_ppo_v0 import BaseTaskRunner
from verl.workers.engine_workers import ActorRolloutRefWorker

from vitos_verl.rollout.actor_patch import apply_actor_patch


class ViToSActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker whose Qwen2.5-VL forward accepts pruned visual tokens.

    verl's ``apply_monkey_patch`` replaces ``Qwen2_5_VLModel.forward`` while the model is
    built, so the ViToS wrapper is applied after ``init_model``.
    """

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        apply_actor_patch()


class ViToSTaskRunner(BaseTaskRunner):
    """verl's task runner with the ViToS worker and trainer (runs as a Ray actor)."""

    def add_actor_rollout_worker(self, config):
        _, group_cls = super().add_actor_rollout_worker(config)
        for role in list(self.role_worker_mapping):
            self.role_worker_mapping[role] = ray.remote(ViToSActorRolloutRefWorker)
        return ViToSActorRolloutRefWorker, group_cls

    def run(self, config):
        from pprint import pprint

        from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler, need_critic, need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config
        from verl.utils.dataset.rl_dataset import collate_fn
        from verl.workers.config import HFModelConfig

        from vitos_verl.trainer.ray_trainer import ViToSRayTrainer

        print(f"ViToS task runner on {socket.gethostname()}, pid {os.getpid()}")
        pprint(OmegaConf.to_container(config, resolve=True))
        OmegaConf.resolve(config)
        _, group_cls = self.add_actor_rollout_worker(config)
        self.add_critic_worker(config)
        self.add_reward_model_resource_pool(config)
        validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        tokenizer, processor = model_config.tokenizer, model_config.processor
        train = create_rl_dataset(config.data.train_files, config.data, tokenizer, processor, is_train=True,
                                  max_samples=config.data.get("train_max_samples", -1))
        val = create_rl_dataset(config.data.val_files, config.data, tokenizer, processor, is_train=False,
                                max_samples=config.data.get("val_max_samples", -1))
        trainer = ViToSRayTrainer(
            config=config,
            tokenizer=tokenizer,
            processor=processor,
            role_worker_mapping=self.role_worker_mapping,
            resource_pool_manager=self.init_resource_pool_mgr(config),
            ray_worker_group_cls=group_cls,
            train_dataset=train,
            val_dataset=val,
            collate_fn=collate_fn,
            train_sampler=create_rl_sampler(config.data, train),
        )
        trainer.init_workers()
        trainer.fit()


def check_config(config: DictConfig) -> None:
    """Start-up checks that need no Ray (the ``vitos`` block, batch sizes, the legacy path).

    Raises:
        ValueError: an invalid combination, with the reason.
    """
    from vitos_verl.trainer.config import ViToSConfig

    cfg = ViToSConfig.from_mapping(OmegaConf.to_container(config.vitos, resolve=True))
    cfg.check_batch(int(config.data.train_batch_size), int(config.actor_rollout_ref.actor.ppo_mini_batch_size))
    if int(config.actor_rollout_ref.rollout.n) != cfg.n_g:
        raise ValueError(f"actor_rollout_ref.rollout.n={config.actor_rollout_ref.rollout.n} must equal vitos.n_g={cfg.n_g}")
    if config.trainer.use_v1:
        raise ValueError("the ViToS trainer runs on verl's DataProto driver: set trainer.use_v1=false")
    if config.algorithm.adv_estimator != "grpo":
        raise ValueError(f"ViToS uses GRPO advantages per stream; algorithm.adv_estimator={config.algorithm.adv_estimator!r}")


@hydra.main(config_path="conf", config_name="vitos", version_base=None)
def main(config: DictConfig) -> None:
    """Train ViToS with the composed config (see module doc)."""
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    # Ray actors run in other working directories: relative paths are resolved here.
    config.outputs_dir = os.path.abspath(config.outputs_dir)
    OmegaConf.resolve(config)
    check_config(config)
    if config.get("dry_run", False):
        print(OmegaConf.to_yaml(config, resolve=True))
        return
    run_ppo(config, task_runner_class=ray.remote(ViToSTaskRunner))


if __name__ == "__main__":
    main()
