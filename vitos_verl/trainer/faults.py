"""Failed samples: how they are marked in a batch, counted, and kept out of the loss.

A sample fails when its agent loop raised (rollout or the reward loop's call; the agent-loop
worker, :class:`vitos_verl.rollout.agent_loop.ViToSAgentLoopWorker`, then returns a placeholder
with :data:`FAILED_KEY` = 1 and the fault in :data:`FAULT_KEY` / :data:`ERROR_KEY`), or when its
reward raised or ran past ``vitos.reward_timeout_s`` (:mod:`vitos_verl.rewards.guard` sets the
``reward_error`` / ``reward_timeout`` columns). The step goes on: a failed sample is counted
(``<stream>/failed/*``), left out of the reward means, gets zero advantage and has its
``response_mask`` zeroed, so it adds nothing to any loss term.

Columns (``DataProto.non_tensor_batch``, one entry per sample; a missing column means "none
failed that way"): :data:`~vitos_verl.records.FAILED_KEY` (0/1), :data:`~vitos_verl.records.FAULT_KEY`
(``""``, ``"rollout"`` or ``"reward"``), :data:`~vitos_verl.records.ERROR_KEY`
(``"<ExceptionType>: <message>"`` or ``""``), all three named in :mod:`vitos_verl.records` (the
rollout workers write them), and ``reward_timeout`` and ``reward_error`` (0.0/1.0).
"""

from __future__ import annotations

import numpy as np
import torch

from vitos_verl.records import ERROR_KEY, FAILED_KEY, FAULT_KEY

FAULT_KINDS = ("rollout", "reward_error", "reward_timeout")


def _column(nt: dict, key: str, n: int, default) -> np.ndarray:
    values = nt.get(key)
    return np.full(n, default, dtype=object) if values is None else np.asarray(values, dtype=object)


def failure_kinds(nt: dict, n: int) -> dict[str, np.ndarray]:
    """Which samples failed, per kind of fault.

    Args:
        nt: a batch's ``non_tensor_batch``.
        n: the batch size.

    Returns:
        :data:`FAULT_KINDS` -> bool ``(n,)``. ``rollout``: the agent loop raised while generating;
        ``reward_error``: the reward raised (in the guard, or the reward loop's call itself);
        ``reward_timeout``: the reward ran past its time limit.
    """
    failed = _column(nt, FAILED_KEY, n, 0).astype(bool)
    fault = _column(nt, FAULT_KEY, n, "")
    return {
        "rollout": failed & (fault != "reward"),
        "reward_error": (failed & (fault == "reward")) | _column(nt, "reward_error", n, 0.0).astype(float).astype(bool),
        "reward_timeout": _column(nt, "reward_timeout", n, 0.0).astype(float).astype(bool),
    }


def failed_mask(nt: dict, n: int) -> np.ndarray:
    """bool ``(n,)``: samples that failed in any way (:func:`failure_kinds`)."""
    kinds = failure_kinds(nt, n)
    return np.logical_or.reduce([kinds[k] for k in FAULT_KINDS])


def fault_metrics(stream: str, nt: dict, n: int) -> dict[str, float]:
    """Counts of failed samples: ``<stream>/failed/{total,rollout,reward_error,reward_timeout}``."""
    kinds = failure_kinds(nt, n)
    out = {f"{stream}/failed/{k}": float(v.sum()) for k, v in kinds.items()}
    out[f"{stream}/failed/total"] = float(failed_mask(nt, n).sum())
    return out


def check_not_all_failed(stream: str, nt: dict, n: int) -> None:
    """One bad sample must not end a run, but a stream in which every sample failed is broken.

    Raises:
        RuntimeError: every one of the ``n > 0`` samples failed; names the first error.
    """
    failed = failed_mask(nt, n)
    if n and failed.all():
        errors = [str(e) for e in _column(nt, ERROR_KEY, n, "") if e]
        first = errors[0] if errors else "every reward raised or ran past vitos.reward_timeout_s (see the reward workers' log)"
        raise RuntimeError(f"all {n} {stream} samples of the step failed; first error: {first}")


def mask_failed(batch, failed: np.ndarray) -> np.ndarray:
    """Take failed samples out of the loss and out of their GRPO groups, in place.

    Their ``response_mask`` rows become 0 (verl's GRPO multiplies the advantage by it, and every
    loss term is aggregated over it) and each gets a ``uid`` of its own, so the mean and std of
    its question's group are those of the samples that did not fail.

    Args:
        batch: a verl ``DataProto`` with ``response_mask`` ``(N, T)`` and ``uid`` ``(N,)``.
        failed: bool ``(N,)``.

    Returns:
        The original ``uid`` column, to put back after ``compute_advantage``.
    """
    uid = batch.non_tensor_batch["uid"]
    idx = np.flatnonzero(failed)
    if idx.size:
        batch.batch["response_mask"][torch.as_tensor(idx, dtype=torch.long)] = 0
        new = uid.copy()
        new[idx] = [f"{uid[i]}/failed/{i}" for i in idx]
        batch.non_tensor_batch["uid"] = new
    return uid


def mask_malformed(batch) -> float:
    """Take samples that fail their stream's template out of the loss, in place, after the advantages.

    A sample with ``format == 0`` (``non_tensor_batch["format"]``, the reward's format score:
    a grounding output without a well-formed box, an answer outside the template) keeps its
    reward in its GRPO group, so the well-formed samples of the group get the higher advantage,
    but its ``response_mask`` and ``advantages`` rows become 0, so its tokens are not pushed down
    (``vitos.mask_malformed``; :class:`vitos_verl.trainer.config.ViToSConfig`).

    Args:
        batch: a verl ``DataProto`` with ``response_mask`` and ``advantages`` ``(N, T)`` and a
            ``format`` column ``(N,)`` of floats in ``[0, 1]``.

    Returns:
        The fraction of the batch's samples taken out, logged as ``<stream>/masked_malformed``.

    Raises:
        KeyError: the batch has no ``format`` column (its rewards were not computed).
    """
    bad = np.asarray(batch.non_tensor_batch["format"], dtype=np.float64) <= 0.0
    idx = torch.as_tensor(np.flatnonzero(bad), dtype=torch.long)
    if idx.numel():
        batch.batch["response_mask"][idx] = 0
        batch.batch["advantages"][idx] = 0.0
    return float(bad.mean()) if bad.size else 0.0
