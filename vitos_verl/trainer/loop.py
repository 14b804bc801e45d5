"""When the training loop saves and validates: verl 0.9.1's rules, and an end however the loop ends.

verl 0.9.1's ``RayPPOTrainer.fit`` saves at step ``s`` when ``trainer.save_freq > 0`` and ``s``
is the last step, a multiple of ``save_freq``, or the capacity block is about to expire
(``should_save_ckpt_esi``), and validates when ``trainer.test_freq > 0`` and ``s`` is the last
step or a multiple of ``test_freq``. Its last step is ``trainer.total_training_steps``: when the
dataloader's epochs run out first (``total_training_steps`` set above
``len(dataloader) * total_epochs``, or a resumed epoch that yields fewer batches), its loop ends
with neither. ViToS's ``fit`` ends at :func:`last_step` and, if the loop still stops earlier,
catches up with :func:`final_actions`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepActions:
    """What the loop does after a training step.

    Attributes:
        save: write a checkpoint (``save_checkpoint``) of this step.
        validate: run validation and log it at this step.
    """

    save: bool
    validate: bool


def last_step(total_training_steps: int, steps_per_epoch: int, total_epochs: int) -> int:
    """The step the loop ends on: ``total_training_steps``, or earlier when the data runs out.

    Args:
        total_training_steps: verl's ``RayPPOTrainer.total_training_steps`` (``len(dataloader) *
            total_epochs`` unless ``trainer.total_training_steps`` overrides it).
        steps_per_epoch: ``len(train_dataloader)`` (one batch per step).
        total_epochs: ``trainer.total_epochs``.
    """
    return min(int(total_training_steps), int(steps_per_epoch) * int(total_epochs))


def step_actions(step: int, last: int, save_freq: int, test_freq: int, esi_expiring: bool = False) -> StepActions:
    """verl 0.9.1's save / validate rule after training step ``step`` (1-based).

    Args:
        step: the step just trained.
        last: :func:`last_step`.
        save_freq: ``trainer.save_freq`` (<= 0: never save).
        test_freq: ``trainer.test_freq`` (<= 0: never validate).
        esi_expiring: verl's ``should_save_ckpt_esi`` (the capacity block ends soon).
    """
    is_last = step >= last
    return StepActions(
        save=save_freq > 0 and (is_last or step % save_freq == 0 or esi_expiring),
        validate=test_freq > 0 and (is_last or step % test_freq == 0),
    )


def final_actions(step: int, saved_step: int, validated_step: int, save_freq: int, test_freq: int) -> StepActions:
    """What a loop that stopped before :func:`last_step` still owes its last completed step.

    Args:
        step: the last completed step (the resumed step if none ran in this launch).
        saved_step: the last step checkpointed (or resumed from) in this launch.
        validated_step: the last step validated in this launch (or the resumed step).
        save_freq, test_freq: as in :func:`step_actions`; <= 0 keeps that action off.
    """
    return StepActions(save=save_freq > 0 and step > saved_step, validate=test_freq > 0 and step > validated_step)
