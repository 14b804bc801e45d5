"""verl's timing and throughput metrics, per stream and for the whole ViToS step.

verl 0.9.1's ``RayPPOTrainer.fit`` logs ``compute_timing_metrics`` and
``compute_throughout_metrics`` (``verl/trainer/ppo/metric_utils.py``) of its one batch, with
stage timers named ``gen``, ``old_log_prob``, ``ref``, ``adv``, ``update_actor`` and ``step``.
A ViToS step has two batches and times each stream's stages apart (``gen_<stream>``,
``old_log_prob/<stream>``, ``ref/<stream>``, ``adv/<stream>``, ``update/<stream>``): these
helpers map those timers onto verl's names and call verl's functions on each stream's batch.
"""

from __future__ import annotations

from collections.abc import Mapping

from verl import DataProto
from verl.trainer.ppo.metric_utils import compute_throughout_metrics, compute_timing_metrics

# verl's stage name -> the ViToS trainer's timer of that stage for stream ``{s}``
STREAM_TIMERS = {
    "gen": "gen_{s}",
    "old_log_prob": "old_log_prob/{s}",
    "ref": "ref/{s}",
    "adv": "adv/{s}",
    "update_actor": "update/{s}",
}


def stream_timing(stream: str, timing: Mapping[str, float]) -> dict[str, float]:
    """One stream's stage times under verl's stage names, plus ``step``: their sum.

    Args:
        stream: ``grounding`` or ``reasoning``.
        timing: the step's ``marked_timer`` dict (seconds); stages absent from it (``ref``
            without a reference policy; ``update_actor`` under ``order: joint``, whose one
            update is ``update/grounding+reasoning``) are left out.

    Returns:
        ``{verl stage: seconds}``; ``step`` is the time spent on this stream alone (the step's
        shared stages, ``prune``, ``reward``, ``update_weights``, ``save_checkpoint``, are not in it).
    """
    out = {verl: float(timing[ours.format(s=stream)]) for verl, ours in STREAM_TIMERS.items() if ours.format(s=stream) in timing}
    out["step"] = sum(out.values())
    return out


def _token_view(batch: DataProto) -> DataProto:
    mask = batch.batch["attention_mask"]
    return DataProto.from_dict(
        tensors={"responses": batch.batch["responses"], "attention_mask": mask},
        meta_info={"global_token_num": mask.sum(-1).tolist()},
    )


def stream_perf_metrics(stream: str, batch: DataProto, timing: Mapping[str, float], n_gpus: int) -> dict[str, float]:
    """verl's timing and throughput metrics of one stream, keyed ``<stream>/<verl key>``.

    Args:
        stream: ``grounding`` or ``reasoning``.
        batch: the stream's batch: ``responses`` ``(N, T_r)`` int64 and ``attention_mask``
            ``(N, T_p + T_r)`` 0/1 (prompt + response tokens; verl's token counts).
        timing: the step's timers in seconds (:func:`stream_timing`).
        n_gpus: accelerators of the resource pools (``resource_pool_manager.get_n_gpus()``).

    Returns:
        ``<stream>/timing_s/<stage>`` (s), ``<stream>/timing_per_token_ms/{gen,ref,adv,update_actor}``
        (ms per response token for ``gen``, per prompt + response token otherwise),
        ``<stream>/perf/total_num_tokens``, ``<stream>/perf/time_per_step`` (s, :func:`stream_timing`'s
        ``step``) and ``<stream>/perf/throughput`` (tokens per second per GPU), all from verl 0.9.1's
        ``compute_timing_metrics`` / ``compute_throughout_metrics``.
    """
    times = stream_timing(stream, timing)
    view = _token_view(batch)
    out = compute_timing_metrics(view, times)
    if times["step"] > 0:
        out.update(compute_throughout_metrics(view, times, n_gpus))
    return {f"{stream}/{k}": v for k, v in out.items()}


def step_perf_metrics(batches: Mapping[str, DataProto], timing: Mapping[str, float], n_gpus: int) -> dict[str, float]:
    """verl's ``perf/{total_num_tokens,time_per_step,throughput}`` of the whole step (both streams).

    Args:
        batches: every stream's batch (``attention_mask`` ``(N, L)`` 0/1).
        timing: the step's timers; ``timing["step"]`` (s) is the whole step.
        n_gpus: as in :func:`stream_perf_metrics`.

    Raises:
        KeyError: no ``step`` timer.
    """
    tokens = [n for b in batches.values() for n in b.batch["attention_mask"].sum(-1).tolist()]
    return compute_throughout_metrics(DataProto(meta_info={"global_token_num": tokens}), dict(timing), n_gpus)
