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
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.trainer.main_ppo import run_ppo
from verl.trainer.main_ppo_v0 import BaseTaskRunner
from verl.workers.engine_workers import ActorRolloutRefWorker

from vitos_verl.compat import verl_0_9
from vitos_verl.rollout.actor_patch import apply_actor_patch
from vitos_verl.trainer.checks import check_config
from vitos_verl.trainer.optim_steps import override_mini_batch, pop_lr_step


def freeze_vision_tower(module) -> int:
    """Stop gradients into every parameter of ``module``'s vision tower (names with a ``visual``
    part: ``model.visual.*`` / ``visual.*``, the patch merger included); returns how many tensors.

    The optimiser built before keeps them but skips them (no gradient, so AdamW neither steps nor
    decays them), autograd records no ViT graph (its inputs need no gradient either), and the
    weight sync re-sends them unchanged, which the vLLM plugin's fingerprint check recognises: each
    image's ViT features are then computed once per run on the rollout side
    (:meth:`vitos_verl.rollout.vllm_model.ViToSQwen2_5_VLForConditionalGeneration.check_vision_weights`).

    Raises:
        ValueError: the module has no vision-tower parameter (not a Qwen2.5-VL policy).
    """
    frozen = [p for name, p in module.named_parameters() if "visual" in name.split(".")]
    if not frozen:
        raise ValueError("freeze_vision_tower: the actor module has no parameter under a 'visual' submodule")
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


class ViToSActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker whose Qwen2.5-VL forward accepts pruned visual tokens.

    verl's ``apply_monkey_patch`` replaces ``Qwen2_5_VLModel.forward`` while the model is
    built, so the ViToS wrapper is applied after ``init_model``. ``update_actor`` takes the
    driver's per-stream mini-batch size (:mod:`vitos_verl.trainer.optim_steps`).
    """

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        """verl's model set-up, then the pruned forward and, with
        ``actor_rollout_ref.actor.freeze_vision_tower`` (verl 0.9.1's config key, which its FSDP
        engine does not act on), the actor's vision tower frozen (:func:`freeze_vision_tower`)."""
        super().init_model()
        apply_actor_patch()
        verl_0_9.install_worker()
        if getattr(self, "_is_actor", False) and bool(self.config.actor.get("freeze_vision_tower", False)):
            n = freeze_vision_tower(self.actor.engine.module)
            print(f"vitos_verl: actor vision tower frozen ({n} parameter tensors)")

    # verl 0.9.1 ActorRolloutRefWorker.update_actor's dispatch (the actor mesh's data-parallel ranks)
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        """verl's ``update_actor`` with the mini-batch size the driver set for this stream.

        Args:
            data: this rank's TensorDict from ``RayPPOTrainer._update_actor`` (verl 0.9.1); its
                ``vitos_mini_batch_size`` (global samples per mini-batch) replaces verl's
                ``mini_batch_size``/``global_batch_size`` (:func:`override_mini_batch`), and its
                ``vitos_step_lr=False`` keeps the LR scheduler still (:func:`vitos_verl.compat.verl_0_9.hold_lr_scheduler`:
                one scheduler step per ViToS step, not one per update).

        Returns:
            verl's output: a TensorDict whose ``metrics`` hold one ``grad_norm`` per optimiser step.
        """
        override_mini_batch(data)
        if pop_lr_step(data):
            return super().update_actor(data)
        with verl_0_9.hold_lr_scheduler(self.actor.engine):  # not the step's last update: LR stays
            return super().update_actor(data)


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


@hydra.main(config_path="conf", config_name="vitos", version_base=None)
def main(config: DictConfig) -> None:
    """Train ViToS with the composed config (see module doc)."""
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    # Ray actors run in other working directories: relative paths are resolved here.
    config.outputs_dir = os.path.abspath(config.outputs_dir)
    OmegaConf.resolve(config)
    check_config(config, check_files=bool(config.get("check_files", True)))
    if config.get("dry_run", False):
        print(OmegaConf.to_yaml(config, resolve=True))
        return
    run_ppo(config, task_runner_class=ray.remote(ViToSTaskRunner))


if __name__ == "__main__":
    main()
