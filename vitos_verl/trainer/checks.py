"""Start-up checks of the composed trainer config, run on the driver before Ray starts.

Everything here needs only the config and the file system, so ``DRY_RUN=1 launch/dualstream.sh``
and ``python -m vitos_verl.trainer.main ... dry_run=true`` refuse a bad config with the reason,
instead of a failure minutes later inside a Ray worker (or never: ``vitos.w_iou=nan`` would
silently turn every grounding score into 0).

:func:`check_config` is the entry; every refusal is a ``ValueError`` whose message names the
config key, the value and what to do.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vitos_verl.pruning import CELL

#: The smallest pixel budget accepted: a 4x4 grid of 28x28-pixel cells. Below it every image is a
#: handful of visual tokens and a box has nothing to select (our choice; the GPU recipes use 1,280).
MIN_VISUAL_TOKENS = 16

# verl keys that must hold numbers: (dotted key, integer?, test, what the test demands).
# ``None`` values are allowed where verl allows them (it derives the value).
_NUMBERS: tuple[tuple[str, bool, Callable[[float], bool], str], ...] = (
    ("data.train_batch_size", True, lambda v: v >= 1, ">= 1"),
    ("data.max_prompt_length", True, lambda v: v >= 1, ">= 1"),
    ("data.max_response_length", True, lambda v: v >= 1, ">= 1 (tokens each stream may generate)"),
    ("data.min_pixels", True, lambda v: v >= CELL * CELL, f">= {CELL * CELL} (one 28x28 cell)"),
    ("data.max_pixels", True, lambda v: v >= MIN_VISUAL_TOKENS * CELL * CELL,
     f">= {MIN_VISUAL_TOKENS * CELL * CELL} ({MIN_VISUAL_TOKENS} visual tokens of 28x28 pixels)"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", True, lambda v: v >= 1, ">= 1"),
    ("actor_rollout_ref.actor.ppo_epochs", True, lambda v: v >= 1, ">= 1"),
    ("actor_rollout_ref.actor.optim.lr", False, lambda v: v >= 0, ">= 0"),
    ("actor_rollout_ref.actor.kl_loss_coef", False, lambda v: v >= 0, ">= 0"),
    ("actor_rollout_ref.actor.clip_ratio", False, lambda v: v > 0, "> 0"),
    ("actor_rollout_ref.rollout.n", True, lambda v: v >= 1, ">= 1"),
    ("actor_rollout_ref.rollout.temperature", False, lambda v: v >= 0, ">= 0"),
    ("actor_rollout_ref.rollout.top_p", False, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("actor_rollout_ref.rollout.gpu_memory_utilization", False, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size", True, lambda v: v >= 1, ">= 1"),
    ("trainer.total_epochs", True, lambda v: v >= 1, ">= 1"),
    ("trainer.total_training_steps", True, lambda v: v >= 1, ">= 1 (or null: derived from the epochs)"),
    ("trainer.save_freq", True, lambda v: v >= 1,
     ">= 1: ViToS always checkpoints (every save_freq steps and at the last step), so a run can resume"),
    ("trainer.test_freq", True, lambda v: v >= 1 or v == -1, ">= 1, or -1 for no periodic validation"),
    ("trainer.nnodes", True, lambda v: v >= 1, ">= 1"),
    ("trainer.n_gpus_per_node", True, lambda v: v >= 1, ">= 1"),
    ("trainer.log_val_generations", True, lambda v: v >= 0, ">= 0 (validation samples logged as a table; 0: none)"),
)

# verl options that ViToSRayTrainer.fit() (which replaces verl's loop) does not honour:
# (dotted key, predicate on the value that means "asked for", why it is refused).
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("algorithm.use_kl_in_reward", bool, "the KL penalty in the reward is not applied per stream; use "
     "actor_rollout_ref.actor.use_kl_loss=true (the KL term in the loss, as the recipes do)"),
    ("algorithm.rollout_correction.rollout_is", lambda v: v is not None,
     "rollout importance sampling (TIS) is not applied to the two streams; set it to null"),
    ("algorithm.rollout_correction.rollout_rs", lambda v: v is not None,
     "rollout rejection sampling is not applied to the two streams; set it to null"),
    ("algorithm.rollout_correction.bypass_mode", bool, "old log-probs are always recomputed per stream"),
    ("algorithm.filter_groups.enable", bool, "dynamic sampling (DAPO group filtering) is not implemented"),
    ("algorithm.use_pf_ppo", bool, "PF-PPO reweighting is not implemented"),
    ("trainer.critic_warmup", lambda v: v not in (None, 0), "GRPO has no critic to warm up; set it to 0"),
    ("global_profiler.steps", lambda v: v not in (None, [], ()), "the profiler is not driven by the ViToS loop"),
)


def _get(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, default=None)


def _check_number(config: DictConfig, key: str, integer: bool, test: Callable[[float], bool], demand: str) -> None:
    value = _get(config, key)
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    is_num = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_num or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{key}={value!r} must be {kind} {demand}")
    if not test(value):
        raise ValueError(f"{key}={value!r} must be {demand}")


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    raise ValueError(f"expected a path or a list of paths, got {value!r}")


def check_data_files(config: DictConfig) -> None:
    """``data.train_files`` and ``data.val_files`` name existing files.

    Raises:
        ValueError: a list is empty, or a file is missing (the message names it and how to make it).
    """
    for key in ("data.train_files", "data.val_files"):
        files = _files(_get(config, key))
        if not files:
            raise ValueError(f"{key} is empty: name the parquet files data_prep writes")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(
                f"{key}: missing {missing}. Prepare them with data_prep (`make data`, or "
                "`python -m data_prep.slake --src ... --out ...`) or point the recipe elsewhere "
                "(outputs_dir / VITOS_OUTPUTS)."
            )


#: The built-in reward entries: (file under vitos_verl/rewards, function, reward_kwargs keys it does not take).
_BUILTIN_REWARDS = (("guard.py", "guarded_compute_score", ()), ("score.py", "compute_score", ("reward_timeout_s",)))


def builtin_reward(fn: Any) -> str | None:
    """The name of the built-in reward entry ``fn`` is (loaded from any path), else ``None``."""
    try:
        src = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:
        return None
    rewards_dir = Path(__file__).resolve().parents[1] / "rewards"
    for file, name, _ in _BUILTIN_REWARDS:
        if src == rewards_dir / file and getattr(fn, "__name__", None) == name:
            return name
    return None


def check_reward_kwargs(config: DictConfig) -> None:
    """The one reward function of both streams, and its kwargs.

    Both streams call ``reward.custom_reward_function`` (the reasoning stream in verl's reward
    loop, the grounding stream on the driver:
    :func:`vitos_verl.trainer.dual_stream.configured_reward_fn`), each call with
    ``reward_kwargs`` merged in. So:

    * the function must load (verl's ``load_extern_object``) and take
      ``data_source, solution_str, ground_truth, extra_info`` and every key of ``reward_kwargs``;
    * for the built-in entries (``vitos_verl.rewards.guard.guarded_compute_score``, the default,
      and ``vitos_verl.rewards.score.compute_score``) ``reward_kwargs`` must equal what the
      ``vitos`` block and the data pixel budget give (:meth:`ViToSConfig.reward_kwargs`;
      ``compute_score`` without ``reward_timeout_s``), so the ``vitos`` weights are the ones scored;
    * a user's function gets its ``reward_kwargs`` as configured: the ``vitos`` reward weights
      reach it only if it takes them. It is told the stream by ``extra_info["stream"]``, gets
      the boxes' answer accuracy as ``extra_info["feedback_acc"]`` (grounding) and must return a
      number or a dict with ``score`` (``acc`` of the reasoning stream is the cross-feedback;
      :func:`vitos_verl.rewards.guard.normalize_scores`).

    Raises:
        ValueError: no function configured, one that does not load or cannot take those
            arguments, or built-in kwargs that differ (lists (configured, expected) per key).
    """
    from verl.utils.import_utils import load_extern_object

    from vitos_verl.trainer.config import ViToSConfig

    path = _get(config, "reward.custom_reward_function.path")
    name = _get(config, "reward.custom_reward_function.name")
    if not path or not name:
        raise ValueError(
            "reward.custom_reward_function.path and .name must name the reward function of both streams "
            "(default pkg://vitos_verl.rewards.guard / guarded_compute_score): verl's default scorers know neither stream"
        )
    configured = OmegaConf.to_container(_get(config, "reward.custom_reward_function.reward_kwargs") or {}, resolve=True)
    try:
        fn = load_extern_object(module_path=str(path), object_name=str(name))
    except Exception as exc:
        raise ValueError(f"reward.custom_reward_function {path}:{name} does not load: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"reward.custom_reward_function {path}:{name} is not callable")
    try:
        inspect.signature(fn).bind(data_source="", solution_str="", ground_truth="", extra_info={}, **configured)
    except TypeError as exc:
        raise ValueError(
            f"reward.custom_reward_function {path}:{name} cannot be called as both streams call it "
            f"(data_source, solution_str, ground_truth, extra_info as keywords, plus reward_kwargs {sorted(configured)}): {exc}"
        ) from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass
    builtin = builtin_reward(fn)
    if builtin is None:
        return
    vitos = ViToSConfig.from_mapping(OmegaConf.to_container(config.vitos, resolve=True))
    expected = vitos.reward_kwargs(int(config.data.min_pixels), int(config.data.max_pixels))
    for k in dict((n, skip) for _, n, skip in _BUILTIN_REWARDS)[builtin]:
        expected.pop(k)
    diff = {k: (configured.get(k), v) for k, v in expected.items() if configured.get(k) != v}
    extra = sorted(set(configured) - set(expected))
    if diff or extra:
        raise ValueError(
            f"reward.custom_reward_function.reward_kwargs must equal the vitos block and the data pixel budget for the "
            f"built-in {builtin} (the reward loop scores the reasoning stream, the driver the grounding one); differing "
            f"(configured, expected): {diff}; unknown keys: {extra}. Use the interpolations of vitos_trainer.yaml."
        )


def check_grounding_budget(config: DictConfig) -> None:
    """One owner of the grounding stream's pixel budget: ``vitos.grounding_max_pixels``.

    Two components read it: the dataset (``data.grounding_max_pixels``, the budget it resizes the
    grounding chat's image to: :class:`vitos_verl.data.dataset.ViToSDataset`) and the trainer
    (``vitos.grounding_max_pixels``, the frame it reads the boxes in and the reward's IoU frame:
    :func:`vitos_verl.pruning.plan.resolve_frames`). ``vitos_trainer.yaml`` sets the first to the
    second; an override of ``data.grounding_max_pixels`` alone would have the model see one frame
    and its boxes read in another, so it is refused.

    Raises:
        ValueError: the two differ (a missing ``data.grounding_max_pixels`` counts as null).
    """
    data_g, vitos_g = _get(config, "data.grounding_max_pixels"), _get(config, "vitos.grounding_max_pixels")
    if data_g != vitos_g:
        raise ValueError(
            f"data.grounding_max_pixels={data_g!r} differs from vitos.grounding_max_pixels={vitos_g!r}: the dataset "
            "would resize the grounding image to one budget and the trainer read its boxes in the other's frame. "
            "Set only vitos.grounding_max_pixels (data.grounding_max_pixels follows it in vitos_trainer.yaml)."
        )


#: The grounding prompt's variables the dataset reads (``data.<key>``) and their owners in the
#: ``vitos`` block, with the value a missing data key means (what :class:`ViToSDataset` then uses).
_GROUNDING_PROMPT_KEYS = (("box_format", "box_format", "abs"), ("w_acc", "w_acc", 0.0))


def check_grounding_prompt(config: DictConfig) -> None:
    """One owner of the grounding prompt's variables: ``vitos.box_format`` and ``vitos.w_acc``.

    The dataset renders the grounding prompt (:class:`vitos_verl.data.dataset.ViToSDataset`) from
    ``data.box_format`` (the coordinates it asks the box in) and ``data.w_acc`` (above 0 it asks
    for the answer too); the trainer parses and scores the boxes in ``vitos.box_format`` and the
    answer with ``vitos.w_acc`` (the planner, :func:`vitos_verl.pruning.plan.plan`, and the reward,
    :func:`vitos_verl.rewards.score.grounding_score`). ``vitos_trainer.yaml`` sets the data keys to
    the vitos ones; an override of a data key alone would have the model asked for one format and
    read in another (a norm1 box read as pixels lands in the image's top-left cell), so it is refused.

    Raises:
        ValueError: a pair differs (a missing data key counts as its default: ``abs``, ``0.0``),
            or ``data.w_acc`` is not a number.
    """
    for data_key, vitos_key, default in _GROUNDING_PROMPT_KEYS:
        data_v, vitos_v = _get(config, f"data.{data_key}"), _get(config, f"vitos.{vitos_key}")
        data_v = default if data_v is None else data_v
        vitos_v = default if vitos_v is None else vitos_v
        if data_key == "w_acc":  # 1 and 1.0 are one value
            try:
                data_v, vitos_v = float(data_v), float(vitos_v)
            except (TypeError, ValueError):
                raise ValueError(f"data.w_acc={data_v!r} must be a number (set vitos.w_acc)") from None
        if data_v != vitos_v:
            raise ValueError(
                f"data.{data_key}={data_v!r} differs from vitos.{vitos_key}={vitos_v!r}: the dataset would write the "
                "grounding prompt with one value and the trainer read and score its output with the other. Set only "
                f"vitos.{vitos_key} (data.{data_key} follows it in vitos_trainer.yaml)."
            )


def unsupported_options(config: DictConfig) -> Iterable[tuple[str, Any, str]]:
    """The verl options set in ``config`` that the ViToS loop does not honour: ``(key, value, why)``."""
    for key, asked, why in _UNSUPPORTED:
        value = _get(config, key)
        if value is not None and asked(value):
            yield key, value, why


def check_data_parallel(config: DictConfig, cfg: Any) -> None:
    """Each stream's samples must split evenly over the data-parallel ranks and, per rank, into
    whole micro-batches.

    Data-parallel ranks: ``trainer.nnodes * trainer.n_gpus_per_node`` divided by the actor's
    ``ulysses_sequence_parallel_size``. Samples per step: ``data.train_batch_size * n_g`` for the
    grounding stream, ``* n_g * n_r`` for the reasoning stream (``cfg``: the
    :class:`~vitos_verl.trainer.config.ViToSConfig`). Without dynamic batch sizes, verl 0.9.1's
    engine (``prepare_micro_batches``, ``verl/workers/engine/utils.py``) asserts that a rank's
    batch is a whole number of micro-batches: for the old and reference log-probs
    (``rollout.`` / ``ref.log_prob_micro_batch_size_per_gpu``, per stream) and for each
    optimiser step's mini-batch (``actor.ppo_micro_batch_size_per_gpu``). A mismatch would
    otherwise stop the first step inside a Ray worker, e.g. on two ranks where one fitted.

    Raises:
        ValueError: naming the stream, the samples per rank and the key to change.
    """
    arr = config.actor_rollout_ref
    ranks = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
    sp = int(_get(config, "actor_rollout_ref.actor.ulysses_sequence_parallel_size") or 1)
    if ranks % sp:
        raise ValueError(f"trainer.nnodes * trainer.n_gpus_per_node = {ranks} GPUs is not a multiple of "
                         f"actor.ulysses_sequence_parallel_size={sp}")
    dp = ranks // sp
    batch = int(config.data.train_batch_size)
    samples = {"grounding": batch * cfg.n_g, "reasoning": batch * cfg.n_g * cfg.n_r}
    fix = (f"(data.train_batch_size={batch}, vitos.n_g={cfg.n_g}, vitos.n_r={cfg.n_r}, {dp} data-parallel ranks): "
           "lower the micro-batch size or raise data.train_batch_size")
    for stream, n in samples.items():
        if n % dp:
            raise ValueError(f"the {stream} stream's {n} samples per step do not split over {dp} data-parallel ranks {fix}")
    micro = []
    if not _get(config, "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz"):
        micro.append("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu")
    if _get(config, "actor_rollout_ref.actor.use_kl_loss") and not _get(config, "actor_rollout_ref.ref.log_prob_use_dynamic_bsz"):
        micro.append("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu")
    for key in micro:
        size = _get(config, key)
        for stream, n in samples.items():
            if size and (n // dp) % int(size):
                raise ValueError(f"{key}={size} does not divide the {stream} stream's {n // dp} samples per rank {fix}")
    size = None if arr.actor.get("use_dynamic_bsz") else _get(config, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")
    if size:
        mini = int(arr.actor.ppo_mini_batch_size)
        for name, steps in cfg.update_optim_steps(batch, mini).items():
            n = sum(samples[s] for s in name.split("+")) // steps // dp
            if n % int(size):
                raise ValueError(f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={size} does not divide the "
                                 f"{name} update's {n} samples per rank and optimiser step {fix}")


def check_config(config: DictConfig, check_files: bool = True) -> None:
    """All start-up checks (see module doc); needs no Ray, reads only the config and the files.

    Args:
        config: the composed, resolved trainer config (verl's ``ppo_trainer`` + ``vitos``).
        check_files: also require ``data.train_files`` / ``data.val_files`` to exist.

    Raises:
        ValueError: the first problem found, with the key, the value and the reason.
    """
    from vitos_verl.trainer.config import ViToSConfig

    # the vitos block first: verl keys such as rollout.n interpolate it, and the message should
    # name the key the user set
    cfg = ViToSConfig.from_mapping(OmegaConf.to_container(config.vitos, resolve=True))
    for key, integer, test, demand in _NUMBERS:
        _check_number(config, key, integer, test, demand)
    min_px, max_px = int(config.data.min_pixels), int(config.data.max_pixels)
    if max_px < min_px:
        raise ValueError(f"data.max_pixels={max_px} < data.min_pixels={min_px}: the pixel budget is empty")
    cfg.check_batch(int(config.data.train_batch_size), int(config.actor_rollout_ref.actor.ppo_mini_batch_size))
    cfg.grounding_pixels(min_px, max_px)  # a low-resolution budget above data.max_pixels would upsample
    check_grounding_budget(config)
    check_grounding_prompt(config)
    if int(config.actor_rollout_ref.rollout.n) != cfg.n_g:
        raise ValueError(f"actor_rollout_ref.rollout.n={config.actor_rollout_ref.rollout.n} must equal vitos.n_g={cfg.n_g}")
    check_data_parallel(config, cfg)
    if config.trainer.use_v1:
        raise ValueError("the ViToS trainer runs on verl's DataProto driver: set trainer.use_v1=false")
    if config.algorithm.adv_estimator != "grpo":
        raise ValueError(f"ViToS uses GRPO advantages per stream; algorithm.adv_estimator={config.algorithm.adv_estimator!r}")
    check_reward_kwargs(config)
    refused = list(unsupported_options(config))
    if refused:
        lines = "; ".join(f"{k}={v!r}: {why}" for k, v, why in refused)
        raise ValueError(f"options the ViToS trainer does not honour (refused rather than ignored): {lines}")
    if check_files:
        check_data_files(config)
