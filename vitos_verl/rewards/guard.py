"""A time limit and an exception fence around a reward function (by default
:func:`vitos_verl.rewards.compute_score`).

verl 0.9.1's reward loop (``verl/experimental/reward_loop/reward_manager/naive.py``,
``NaiveRewardManager.run_single``) calls a synchronous custom reward function through
``loop.run_in_executor(None, ...)`` with no time limit, and an exception there ends the sample's
agent loop. :func:`guarded_compute_score` is the entry the trainer config names instead
(``reward.custom_reward_function``): a call that raises or runs past ``reward_timeout_s`` scores
zero and says so in two extra keys, ``reward_timeout`` and ``reward_error`` (1.0 or 0.0), which
verl carries into the batch (``reward_extra_info``) and the trainer counts as a failed sample.
The same fence wraps any configured function (:func:`guard_reward_fn`): the driver-side grounding
reward (:func:`vitos_verl.trainer.dual_stream.grounding_rewards`) calls the configured function
through it, and :func:`normalize_scores` gives both streams one key set whatever the function
returns.

The call runs in a fresh daemon thread: the caller waits at most ``reward_timeout_s``, then goes
on. A thread cannot be killed, so a call that never returns keeps its thread (daemon threads do
not block the process from exiting). A process would be killable, but would pickle every sample
and pay a process start or a pool to manage for a function that takes milliseconds; our rewards
are pure Python with inputs capped at ``MAX_TEXT_CHARS``, so a thread is the choice. Limit: a
call stuck inside C code that holds the GIL (e.g. one huge regular-expression match) blocks the
waiting thread too, so the limit cannot fire until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
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


def normalize_scores(result: Any) -> dict[str, Any]:
    """A reward function's result as the key set both streams carry (:data:`GUARDED_KEYS`).

    verl 0.9.1's reward loop (``NaiveRewardManager.run_single``) accepts a number (the score,
    also logged as ``acc``) or a dict with ``score``; the ViToS trainer reads every key of
    :data:`SCORE_KEYS` of both streams (``acc`` of the answers is the boxes' cross-feedback). So:
    a number ``x`` becomes ``score = acc = x``; a dict keeps its keys, ``acc`` defaults to
    ``score``, every other missing key of :data:`GUARDED_KEYS` is 0.0 (``has_gt_box = 0``: no IoU
    is reported).

    Raises:
        TypeError: ``result`` is neither a real number nor a dict.
        KeyError: a dict without ``score``.
    """
    if isinstance(result, Mapping):
        if "score" not in result:
            raise KeyError(f"a reward function's dict needs 'score'; got keys {sorted(result)}")
        out = dict(result)
    elif isinstance(result, (int, float)) and not isinstance(result, bool):
        out = {"score": float(result)}
    else:
        raise TypeError(f"a reward function must return a number or a dict with 'score', got {type(result).__name__}")
    out.setdefault("acc", out["score"])
    for k in GUARDED_KEYS:
        out.setdefault(k, 0.0)
    return out


def guarded_call(
    fn: Callable[..., Any],
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None,
    reward_timeout_s: float,
    **kwargs: Any,
) -> dict[str, Any]:
    """``fn(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **kwargs)`` under a
    time limit, with no exceptions, its result normalised (:func:`normalize_scores`).

    ``fn`` is any verl custom reward function (sync, or async: a coroutine it returns is run to
    completion in the worker thread).

    Returns:
        The normalised scores with ``reward_timeout = reward_error = 0.0``, or
        :func:`failed_scores` (all zero, the matching flag 1.0) when the call ran past
        ``reward_timeout_s``, raised, or returned something :func:`normalize_scores` refuses;
        either is logged with the data source and stream.

    Raises:
        ValueError: ``reward_timeout_s`` is not positive (a configuration error, not a sample's fault).
    """
    if not reward_timeout_s > 0:
        raise ValueError(f"reward_timeout_s must be positive, got {reward_timeout_s!r}")
    stream = (extra_info or {}).get("stream", "reasoning")

    def call() -> dict[str, Any]:
        out = fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info, **kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(_awaited(out))
        return normalize_scores(out)

    try:
        out = call_with_timeout(call, reward_timeout_s)
    except RewardTimeout:
        logger.warning("reward of a %s/%s sample ran past %g s: scored 0 (response %r...)", data_source, stream, reward_timeout_s, str(solution_str)[:80])
        return failed_scores(timeout=True)
    except Exception:
        logger.exception("reward of a %s/%s sample raised: scored 0", data_source, stream)
        return failed_scores(error=True)
    return {**out, "reward_timeout": 0.0, "reward_error": 0.0}


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def guard_reward_fn(fn: Callable[..., Any], reward_timeout_s: float) -> Callable[..., dict[str, Any]]:
    """``fn`` (a verl custom reward function) as :func:`guarded_call` calls it: same signature.

    Used for the grounding stream on the driver
    (:func:`vitos_verl.trainer.dual_stream.configured_reward_fn`); the reasoning stream gets the
    same normalisation and limit in the agent-loop worker
    (:meth:`vitos_verl.rollout.agent_loop.ViToSAgentLoopWorker.score_sample`).

    Raises:
        ValueError: ``reward_timeout_s`` is not positive.
    """
    if not reward_timeout_s > 0:
        raise ValueError(f"reward_timeout_s must be positive, got {reward_timeout_s!r}")

    def guarded(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        return guarded_call(fn, data_source, solution_str, ground_truth, extra_info, reward_timeout_s, **kwargs)

    guarded.__name__ = f"guarded_{getattr(fn, '__name__', 'reward_fn')}"
    return guarded


def guarded_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    reward_timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward entry (the default): :func:`compute_score` under :func:`guarded_call`.

    Args:
        reward_timeout_s: seconds one call may take (config ``vitos.reward_timeout_s``, passed
            through ``reward_kwargs``).
        data_source, solution_str, ground_truth, extra_info, **kwargs: as :func:`compute_score`.

    Returns:
        Every key of :data:`GUARDED_KEYS` (floats), as :func:`guarded_call`.

    Raises:
        ValueError: ``reward_timeout_s`` is not positive.
    """
    # looked up at call time, so a test can swap the module's compute_score
    return guarded_call(lambda **kw: compute_score(**kw), data_source, solution_str, ground_truth, extra_info, reward_timeout_s, **kwargs)
