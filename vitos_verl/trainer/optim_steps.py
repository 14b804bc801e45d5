"""Each stream's actor update takes a configured number of optimiser steps (``vitos.optim_steps``).

verl 0.9.1 sizes every actor update alike: ``RayPPOTrainer._update_actor``
(``verl/trainer/ppo/ray_trainer.py``) sends ``ActorRolloutRefWorker.update_actor`` a TensorDict
with ``mini_batch_size = global_batch_size = actor.ppo_mini_batch_size * rollout.n`` samples,
and ``TrainingWorker.train_mini_batch`` (``verl/workers/engine_workers.py``) cuts each
data-parallel rank's share into mini-batches of ``mini_batch_size / dp_size`` samples, for
``actor.ppo_epochs`` epochs, one ``train_batch`` (one optimiser step) per mini-batch. With
``rollout.n = n_g``, the reasoning stream (``n_r`` times the samples) would take ``n_r`` times
the grounding stream's steps.

ViToS sizes each update itself: the driver puts :data:`MINI_BATCH_KEY` (global samples per
mini-batch) in the batch's ``meta_info``, which ``DataProto.to_tensordict`` carries into the
TensorDict as non-tensor data, and the ViToS worker
(:class:`vitos_verl.trainer.main.ViToSActorRolloutRefWorker`) replaces verl's two keys with it
(:func:`override_mini_batch`) before verl's ``update_actor`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from vitos_verl.compat import verl_0_9

MINI_BATCH_KEY = "vitos_mini_batch_size"
LR_STEP_KEY = "vitos_step_lr"  # False on every update of a ViToS step but its last


def mini_batch_size(n_samples: int, steps: int, name: str = "update") -> int:
    """Samples per mini-batch (all data-parallel ranks together) for ``steps`` steps per epoch.

    Args:
        n_samples: samples in the update's batch.
        steps: optimiser steps per PPO epoch (``ViToSConfig.update_optim_steps``).
        name: the update's name, for the error message.

    Returns:
        ``n_samples // steps``.

    Raises:
        ValueError: ``steps`` is not positive or does not divide ``n_samples``.
    """
    if steps < 1 or n_samples % steps:
        raise ValueError(f"the {name} update's {n_samples} samples do not split into {steps} equal mini-batches")
    return n_samples // steps


def override_mini_batch(data: TensorDict) -> int | None:
    """Replace verl's mini-batch size with the driver's :data:`MINI_BATCH_KEY`, in place.

    Sets both keys verl 0.9.1's ``RayPPOTrainer._update_actor`` sets from
    ``ppo_mini_batch_size * rollout.n``: ``mini_batch_size`` (how ``train_mini_batch`` splits the
    batch) and ``global_batch_size`` (the sequence-mean loss modes' normaliser, ``agg_loss``).

    Args:
        data: the TensorDict ``update_actor`` receives (one data-parallel rank's share).

    Returns:
        The mini-batch size set (samples over all ranks), or None when the key is absent and
        verl's sizing stands.
    """
    size = tu.pop(data, key=MINI_BATCH_KEY, default=None)
    if size is None:
        return None
    size = int(size)
    verl_0_9.set_update_mini_batch(data, size)
    return size


def optim_steps_taken(metrics: Mapping[str, Any]) -> int:
    """Optimiser steps an actor update took, from verl's update metrics.

    verl 0.9.1's ``TrainingWorker.train_mini_batch`` appends one ``grad_norm`` per mini-batch
    (``BaseEngine.train_batch``: one ``optimizer_step`` each; a non-finite norm skips the step),
    so the length of ``actor/grad_norm`` is the count over all epochs.

    Args:
        metrics: ``_update_actor(...).meta_info["metrics"]`` before ``reduce_metrics``.

    Raises:
        KeyError: no ``actor/grad_norm`` in ``metrics``.
    """
    norms = metrics["actor/grad_norm"]
    return len(norms) if isinstance(norms, list | tuple) else 1


def pop_lr_step(data: TensorDict) -> bool:
    """Whether this ``update_actor`` call may advance the LR scheduler (:data:`LR_STEP_KEY`, popped;
    True when absent, verl's own behaviour)."""
    return bool(tu.pop(data, key=LR_STEP_KEY, default=True))
