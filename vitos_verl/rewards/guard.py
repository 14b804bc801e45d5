"""A time limit and an exception fence around :func:`vitos_verl.rewards.compute_score`.

verl 0.9.1's reward loop (``verl/experimental/reward_loop/reward_manager/naive.py``,
``NaiveRewardManager.run_single``) calls a synchronous custom reward function through
``loop.run_in_executor(None, ...)`` with no time limit, and an exception there ends the sample's
agent loop. :func:`guarded_compute_score` is the entry the trainer config names instead
(``reward.custom_reward_function``): a call that raises or runs past ``reward_timeout_s`` scores
zero and says so in two extra keys, ``reward_timeout`` and ``reward_error`` (1.0 or 0.0), which
verl carries into the batch (``reward_extra_info``) and the trainer counts as a failed sample.
The driver-side grounding reward (:func:`vitos_verl.trainer.dual_stream.grounding_rewards`) uses
the same entry.

The call runs in a fresh daemon thread: the caller waits at most ``reward_timeout_s``, then goes
on. A thread cannot be killed, so a call that never returns keeps its thread (daemon threads do
not block the process from exiting). A process would be killable, but would pickle every sample
and pay a process start or a pool to manage for a function that takes milliseconds; our rewards
are pure Python with inputs capped at ``MAX_TEXT_CHARS``, so a thread is the choice. Limit: a
call stuck inside C code that holds the GIL (e.g. one huge regular-expression match) blocks the
waiting thread too, so the limit cannot fire until it returns.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vitos_verl.rewards.score import SCORE_KEYS, compute_score

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
FAULT_KEYS = ("reward_timeout", "reward_error")
GUARDED_KEYS = SCORE_KEYS + FAULT_KEYS

T = TypeVar("T")


class RewardTimeout(TimeoutError):
    """A reward call ran past its time limit."""


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()`` in a daemon thread; its result, or its exception re-raised, within ``timeout_s``.

    Raises:
        RewardTimeout: ``fn`` did not return within ``timeout_s`` seconds (it keeps running).
        ValueError: ``timeout_s`` is not positive.
        Exception: whatever ``fn`` raised.
    """
    if not timeout_s > 0:
        raise ValueError(f"reward time limit must be positive, got {timeout_s!r}")
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # delivered to the waiting caller
            fut.set_exception(exc)

    threading.Thread(target=target, name="vitos-reward", daemon=True).start()
    try:
        return fut.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        if fut.done():  # fn itself raised a TimeoutError
            raise
        raise RewardTimeout(f"reward call ran past {timeout_s:g} s") from None


def failed_scores(timeout: bool = False, error: bool = False) -> dict[str, float]:
    """Zero for every key of :data:`GUARDED_KEYS`, with the fault flags set as given."""
    out = dict.fromkeys(GUARDED_KEYS, 0.0)
    out["reward_timeout"], out["reward_error"] = float(timeout), float(error)
    return out


def guarded_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    reward_timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward entry: :func:`compute_score` with a time limit and no exceptions.

    Args:
        reward_timeout_s: seconds one call may take (config ``vitos.reward_timeout_s``, passed
            through ``reward_kwargs``).
        data_source, solution_str, ground_truth, extra_info, **kwargs: as :func:`compute_score`.

    Returns:
        Every key of :data:`GUARDED_KEYS` (floats): :func:`compute_score`'s scores with
        ``reward_timeout = reward_error = 0.0``, or :func:`failed_scores` (all zero, the
        matching flag 1.0) when the call ran past the limit or raised; either is logged with the
        data source and stream.

    Raises:
        ValueError: ``reward_timeout_s`` is not positive.
    """
    if not reward_timeout_s > 0:  # a configuration error, not a sample's fault
        raise ValueError(f"reward_timeout_s must be positive, got {reward_timeout_s!r}")
    stream = (extra_info or {}).get("stream", "reasoning")
    try:
        out = call_with_timeout(lambda: compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs), reward_timeout_s)
    except RewardTimeout:
        logger.warning("reward of a %s/%s sample ran past %g s: scored 0 (response %r...)", data_source, stream, reward_timeout_s, str(solution_str)[:80])
        return failed_scores(timeout=True)
    except Exception:
        logger.exception("reward of a %s/%s sample raised: scored 0", data_source, stream)
        return failed_scores(error=True)
    return {**out, "reward_timeout": 0.0, "reward_error": 0.0}
