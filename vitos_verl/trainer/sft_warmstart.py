"""verl's SFT trainer with the LM head computed only where the loss needs it.

``torchrun ... -m vitos_verl.trainer.sft_warmstart --config-path ... --config-name ...`` takes
exactly the arguments of ``verl.trainer.sft_trainer`` (verl 0.9.1) and runs its hydra ``main``
after :func:`vitos_verl.compat.verl_0_9.install_sft`. Without remove-padding (the CPU recipes),
verl's FSDP engine computes the LM head over the 151,665-token vocabulary at every prompt
position and the SFT loss keeps only the assistant's tokens; for the learn policy that head was
most of the warm start's step (docs/learning.md section 2 measures the same effect on the actor).
"""

from __future__ import annotations


def main() -> None:
    """Install the SFT hook, then hand the command line to verl's SFT trainer."""
    from vitos_verl.compat import verl_0_9

    verl_0_9.install_sft()
    from verl.trainer import sft_trainer

    sft_trainer.main()


if __name__ == "__main__":
    main()
