"""Driver-side steps of one ViToS training step that need no Ray: from grounding outputs to
reasoning inputs, cross-feedback grounding rewards, and per-stream metrics.

The trainer (:mod:`vitos_verl.trainer.ray_trainer`) calls these between verl's worker calls;
they work on verl ``DataProto`` batches laid out by the agent loop (left-padded prompts of
``prompt_length`` tokens, right-padded responses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitos_verl.pruning import KeepMask, image_geometry
from vitos_verl.pruning.plan import Frames, Plan, plan, resolve_frames
from vitos_verl.rewards.guard import GUARDED_KEYS, guard_reward_fn, guarded_compute_score
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.streams import cross_feedback


def with_stream(extra_infos: Sequence[Mapping[str, Any] | None], stream: str, **more: Any) -> np.ndarray:
    """Copies of the rows' ``extra_info`` dicts with ``stream`` (and ``more``) set; object array ``(N,)``."""
    out = np.empty(len(extra_infos), dtype=object)
    out[:] = [{**dict(e or {}), "stream": stream, **more} for e in extra_infos]
    return out


def row_frames(
    extra_infos: Sequence[Mapping[str, Any]], min_pixels: int, max_pixels: int, grounding_max_pixels: int | None = None
) -> list[Frames]:
    """The grounding and reasoning frames of each dataloader row's image, from ``extra_info.image_size``
    and the pixel budgets (:func:`vitos_verl.pruning.plan.resolve_frames`).

    Raises:
        ValueError: a row without a valid ``image_size`` (the data-prep schema always has it), or a
            ``grounding_max_pixels`` the budget refuses.
    """
    out = []
    for e in extra_infos:
        size = (e or {}).get("image_size")
        if size is None or len(size) != 2:
            raise ValueError(f"extra_info.image_size missing or malformed: {size!r} (re-run data_prep)")
        out.append(resolve_frames(size, min_pixels, max_pixels, grounding_max_pixels))
    return out


def _sample_grid(mm: Mapping[str, Any] | None) -> list[int] | None:
    grid = (mm or {}).get("image_grid_thw")
    return None if grid is None else [int(v) for v in grid[0].tolist()]


def sample_grids(
    multi_modal_inputs: Sequence[Mapping[str, Any] | None], image_sizes: Sequence[Sequence[int]], min_pixels: int, max_pixels: int
) -> list[list[int]]:
    """``image_grid_thw`` ``[t, h, w]`` of each rollout sample's image.

    Read from the sample's ``multi_modal_inputs``; a sample without one (the text-only
    placeholder of a failed rollout, :mod:`vitos_verl.trainer.faults`) gets the grid the processor
    gives its row's ``image_size`` ``(W, H)`` under the pixel budget.
    """
    out = []
    for mm, size in zip(multi_modal_inputs, image_sizes):
        grid = _sample_grid(mm)
        out.append(grid if grid is not None else list(image_geometry(int(size[0]), int(size[1]), min_pixels, max_pixels).grid_thw))
    return out


def sample_frames(
    multi_modal_inputs: Sequence[Mapping[str, Any] | None],
    image_sizes: Sequence[Sequence[int]],
    min_pixels: int,
    max_pixels: int,
    grounding_max_pixels: int | None = None,
) -> list[Frames]:
    """The frames of each grounding rollout sample (:func:`vitos_verl.pruning.plan.resolve_frames`).

    The grounding frame is the grid the processor gave the sample (its ``multi_modal_inputs``:
    the frame its boxes are in), or for a sample without one (a failed rollout's text-only
    placeholder) the grounding budget's; the reasoning frame is that grid too, unless
    low-resolution grounding (``grounding_max_pixels``) gives it the full budget's.

    Args:
        image_sizes: original ``(W, H)`` per sample, pixels.
        min_pixels, max_pixels: the data budget (the reasoning stream's).
    """
    return [
        resolve_frames(size, min_pixels, max_pixels, grounding_max_pixels, grounding_grid=_sample_grid(mm))
        for mm, size in zip(multi_modal_inputs, image_sizes)
    ]


def image_of(messages: Sequence[Mapping[str, Any]]) -> Image.Image | None:
    """The first image of a chat built by the dataset (``{"type": "image", "image": PIL}`` parts)."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image" and isinstance(part.get("image"), Image.Image):
                    return part["image"]
    return None


def replace_image(messages: Sequence[Mapping[str, Any]], image: Image.Image) -> list[dict]:
    """A copy of ``messages`` whose image part shows ``image`` (the crop of ``prune_mode: crop``)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = [
                {k: v for k, v in p.items() if k not in ("bytes", "path")} | {"image": image}
                if p.get("type") == "image"
                else dict(p)
                for p in m["content"]
            ]
        out.append(m)
    return out


@dataclass
class ReasoningPlan:
    """The reasoning stream's inputs made from a batch of grounding samples.

    Attributes:
        box_index: ``(N_r,)`` int, the grounding sample each reasoning sample's box came from.
        raw_prompt: ``(N_r,)`` object, the reasoning chats (the crop replaces the image in crop mode).
        vitos_keep: ``(N_r,)`` object, the request's encoded keep mask per sample
            (:attr:`vitos_verl.pruning.plan.Plan.vitos_keep`; :data:`~vitos_verl.pruning.KEEP_ALL`,
            ``""``, for the full image).
        keep_ratio: ``(N_r,)`` float, visual tokens the reasoning sample sees over the image's.
        grounding_texts: the ``N_g`` decoded grounding responses the boxes came from.
        plans: ``N_g`` :class:`vitos_verl.pruning.plan.Plan`, one per grounding sample: its frames,
            box (grounding and reasoning frames) and keep mask, built once here.
    """

    box_index: np.ndarray
    raw_prompt: np.ndarray
    vitos_keep: np.ndarray
    keep_ratio: np.ndarray
    grounding_texts: list[str]
    plans: list[Plan] = field(default_factory=list)

    @property
    def parsed(self) -> np.ndarray:
        """``(N_g,)`` bool: whether each grounding output held a box on the image."""
        return np.asarray([p.parsed for p in self.plans], dtype=bool)

    @property
    def boxes(self) -> list[list[float] | None]:
        """``N_g`` parsed boxes (the union of an output's boxes) ``[x1, y1, x2, y2]`` in the
        *grounding* stream's resized pixels (what the model emitted), or None where an output held
        no box on the image (:attr:`vitos_verl.pruning.plan.Plan.box_grounding`)."""
        return [p.box_grounding for p in self.plans]

    @property
    def keep_masks(self) -> list[KeepMask]:
        """``N_g`` :class:`~vitos_verl.pruning.KeepMask` over the full image's cells in the
        *reasoning* frame: what the reasoning samples of each box see (all cells unpruned). The
        grounding reward reads their ratios through ``extra_info["keep_ratio"]``
        (:meth:`grounding_keep_ratios`)."""
        return [p.keep_mask for p in self.plans]

    def grounding_keep_ratios(self) -> np.ndarray:
        """``(N_g,)`` float64: each box's keep ratio as the grounding reward charges it: its mask's
        ratio where the output held a box, 1.0 where it did not (whatever ``unparsed_box`` showed
        the answers; :attr:`vitos_verl.pruning.plan.Plan.charged_keep_ratio`)."""
        return np.asarray([p.charged_keep_ratio for p in self.plans], dtype=np.float64)


def plan_reasoning(
    grounding_texts: Sequence[str],
    grids: Sequence[Sequence[int]],
    image_sizes: Sequence[Sequence[int]],
    reasoning_chats: Sequence[Sequence[Mapping[str, Any]]],
    cfg: ViToSConfig,
    n_r: int | None = None,
    reasoning_grids: Sequence[Sequence[int]] | None = None,
) -> ReasoningPlan:
    """Boxes → keep masks → ``n_r`` reasoning inputs per grounding sample, from processor grids
    (:func:`plan_frames` with :meth:`vitos_verl.pruning.plan.Frames.of_grids`).

    Args:
        grounding_texts: ``N_g`` decoded grounding responses.
        grids: ``N_g`` ``image_grid_thw`` rows ``(t, h, w)`` of the image each grounding sample saw
            (the frame its boxes are in).
        image_sizes: ``N_g`` original ``(W, H)`` in pixels.
        reasoning_chats: ``N_g`` reasoning chats (same image as the grounding prompt).
        cfg: the ``vitos`` config.
        n_r: answers per box (default ``cfg.n_r``; validation uses 1).
        reasoning_grids: ``N_g`` grids of the reasoning stream's image when it differs from the
            grounding one (low-resolution grounding, ``vitos.grounding_max_pixels``). Default: ``grids``.

    Raises:
        ValueError: mismatched lengths, and as :func:`plan_frames`.
    """
    reasoning_grids = grids if reasoning_grids is None else reasoning_grids
    if not len(grounding_texts) == len(grids) == len(image_sizes) == len(reasoning_chats) == len(reasoning_grids):
        raise ValueError("grounding texts, grids, image sizes and reasoning chats must have one entry per sample")
    frames = [Frames.of_grids(size, g, rg) for size, g, rg in zip(image_sizes, grids, reasoning_grids)]
    return plan_frames(grounding_texts, frames, reasoning_chats, cfg, n_r=n_r)


def plan_frames(
    grounding_texts: Sequence[str],
    frames: Sequence[Frames],
    reasoning_chats: Sequence[Sequence[Mapping[str, Any]]],
    cfg: ViToSConfig,
    n_r: int | None = None,
) -> ReasoningPlan:
    """Boxes → keep masks → ``n_r`` reasoning inputs per grounding sample (docs/design.md section 1, items 2-3).

    Each output goes through :func:`vitos_verl.pruning.plan.plan` in its frames: parsed in the
    grounding frame, mapped onto the reasoning frame (low-resolution grounding), masked by
    ``cfg.margin_cells`` / ``cfg.min_keep_ratio``, pruned by ``cfg.prune_mode``; an output without
    a box on the image follows ``cfg.unparsed_box`` (``no_feedback``, the default, and ``keep_all``: every visual token).

    Args:
        grounding_texts: ``N_g`` decoded grounding responses.
        frames: ``N_g`` :class:`~vitos_verl.pruning.plan.Frames` of each sample's image
            (:func:`sample_frames`).
        reasoning_chats: ``N_g`` reasoning chats (same image as the grounding prompt).
        cfg: the ``vitos`` config (``prune_mode``, ``box_format``, ``margin_cells``,
            ``min_keep_ratio``, ``unparsed_box``, ``n_r``).
        n_r: answers per box (default ``cfg.n_r``; validation uses 1).

    Returns:
        A :class:`ReasoningPlan` of ``N_g * n_r`` samples, grouped by grounding sample.

    Raises:
        ValueError: mismatched lengths, or a crop-mode chat without an image.
    """
    n_r = cfg.n_r if n_r is None else n_r
    if not len(grounding_texts) == len(frames) == len(reasoning_chats):
        raise ValueError("grounding texts, frames and reasoning chats must have one entry per sample")
    idx, prompts, keeps, ratios, plans = [], [], [], [], []
    for i, (text, fr, chat) in enumerate(zip(grounding_texts, frames, reasoning_chats)):
        p = plan(text, fr, cfg)
        plans.append(p)
        prompt = chat
        if cfg.prune_mode == "crop":
            image = image_of(chat)
            if image is None:
                raise ValueError(f"sample {i}: crop mode needs the reasoning chat's image")
            prompt = replace_image(chat, p.reasoning_input(image).image)
        for _ in range(n_r):
            idx.append(i)
            prompts.append(prompt)
            keeps.append(p.vitos_keep)
            ratios.append(p.keep_ratio)
    raw = np.empty(len(prompts), dtype=object)
    raw[:] = prompts
    return ReasoningPlan(
        np.asarray(idx, dtype=np.int64),
        raw,
        np.asarray(keeps, dtype=object),
        np.asarray(ratios),
        list(grounding_texts),
        plans,
    )


def last_token_scores(scores: Sequence[float], response_mask: torch.Tensor) -> torch.Tensor:
    """verl's token-level reward layout: each score on its response's last valid token.

    Args:
        scores: ``(N,)`` floats.
        response_mask: ``(N, T)`` 0/1.

    Returns:
        float32 ``(N, T)``; an empty response puts its score on token 0.
    """
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    last = (response_mask.sum(-1) - 1).clamp(min=0).long()
    out[torch.arange(len(out)), last] = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    return out


def configured_reward_fn(config: Any) -> Callable[..., dict[str, Any]]:
    """The configured reward function, as the driver calls it for the grounding stream.

    Loaded with verl 0.9.1's ``verl.trainer.ppo.reward.get_custom_reward_fn`` from
    ``reward.custom_reward_function.{path,name,reward_kwargs}``: the same function, loaded the same
    way, that verl's reward loop calls for the reasoning stream, with ``reward_kwargs`` merged
    into every call (they take precedence over the call's own). Wrapped in
    :func:`vitos_verl.rewards.guard.guard_reward_fn` with ``vitos.reward_timeout_s``: a call that
    raises or runs past the limit scores 0 and is flagged; the result is normalised to
    :data:`~vitos_verl.rewards.guard.GUARDED_KEYS`. The stream is in ``extra_info["stream"]``.

    Args:
        config: the composed trainer config (``reward`` and ``vitos`` blocks).

    Raises:
        ValueError: no ``reward.custom_reward_function.path`` (verl's default scorers know
            neither stream).
        FileNotFoundError, AttributeError, ImportError: as verl's loader, for a bad path or name.
    """
    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(config)
    if fn is None:
        raise ValueError("reward.custom_reward_function.path is empty: ViToS needs a reward function for both streams")
    return guard_reward_fn(fn, float(config.vitos.reward_timeout_s))


def grounding_rewards(
    data_sources: Sequence[str],
    texts: Sequence[str],
    ground_truths: Sequence[str],
    extra_infos: Sequence[Mapping[str, Any]],
    answer_acc: Sequence[float],
    box_index: Sequence[int],
    reward_fn: Callable[..., Mapping[str, Any]] | Mapping[str, Any],
    keep_ratios: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Grounding rewards with cross-feedback (docs/design.md section 1, items 4-5).

    The accuracy of the answers made from each box (:func:`cross_feedback`) goes into that
    box's ``extra_info["feedback_acc"]`` (with ``extra_info["stream"] = "grounding"``), and the
    reward function does the rest (for the built-in one: IoU where the row has boxes, format,
    keep ratio). Pass only the answers that did not fail. ``keep_ratios`` (``(N_g,)``, the plan's
    :meth:`ReasoningPlan.grounding_keep_ratios`) go into ``extra_info["keep_ratio"]``, so the
    reward charges the mask the planner built instead of building it again.

    Args:
        reward_fn: the configured function as :func:`configured_reward_fn` returns it (called
            with ``data_source, solution_str, ground_truth, extra_info`` as keywords; it must
            not raise and must return :data:`~vitos_verl.rewards.guard.GUARDED_KEYS`), or a
            mapping of keyword arguments for the built-in entry
            :func:`vitos_verl.rewards.guard.guarded_compute_score` (``reward_timeout_s``
            default 30 s).

    Returns:
        Every key of :data:`vitos_verl.rewards.guard.GUARDED_KEYS` (the score keys plus
        ``reward_timeout`` and ``reward_error``, 0/1) -> float64 ``(N_g,)``.
    """
    if isinstance(reward_fn, Mapping):
        kwargs = dict(reward_fn)

        def reward_fn(**kw):
            return guarded_compute_score(**kw, **kwargs)

    fb = cross_feedback(answer_acc, box_index, len(texts))
    planned = [{} for _ in texts] if keep_ratios is None else [{"keep_ratio": float(k)} for k in keep_ratios]
    rows = [
        reward_fn(
            data_source=ds, solution_str=t, ground_truth=gt,
            extra_info={**dict(e or {}), "stream": "grounding", "feedback_acc": float(f), **k},
        )
        for ds, t, gt, e, f, k in zip(data_sources, texts, ground_truths, extra_infos, fb, planned)
    ]
    return {k: np.asarray([r[k] for r in rows], dtype=np.float64) for k in GUARDED_KEYS}


def group_spread(scores: Sequence[float], uids: Sequence[str]) -> tuple[float, float]:
    """``(mean within-group std, fraction of groups whose rewards vary)``: GRPO's signal.

    A group whose samples all score the same has zero advantage and teaches nothing.
    """
    by: dict[str, list[float]] = {}
    for s, u in zip(scores, uids):
        by.setdefault(str(u), []).append(float(s))
    stds = [float(np.std(v)) for v in by.values()]
    return (float(np.mean(stds)) if stds else 0.0, float(np.mean([s > 1e-8 for s in stds])) if stds else 0.0)


def stream_metrics(stream: str, scores: Mapping[str, Sequence[float]], uids, prompt_len, response_len, failed=None) -> dict:
    """Logged metrics of one stream: mean of every reward key, token counts, group spread.

    ``failed`` (bool ``(N,)``, optional): samples left out of the reward means and the group
    spread (their zero scores say nothing about the policy); token counts include them.
    """
    ok = np.ones(len(uids), dtype=bool) if failed is None else ~np.asarray(failed, dtype=bool)
    scores = {k: np.asarray(v, dtype=np.float64)[ok] for k, v in scores.items()}
    out = {f"{stream}/reward/{k}": float(np.mean(v)) for k, v in scores.items() if len(v)}
    std, frac = group_spread(scores["score"], np.asarray(uids, dtype=object)[ok])
    out[f"{stream}/reward/group_std"] = std
    out[f"{stream}/reward/groups_varying"] = frac
    p = np.asarray(prompt_len, dtype=np.float64)
    r = np.asarray(response_len, dtype=np.float64)
    out.update(
        {
            f"{stream}/prompt_tokens/mean": float(p.mean()),
            f"{stream}/prompt_tokens/total": float(p.sum()),
            f"{stream}/response_tokens/mean": float(r.mean()),
            f"{stream}/response_tokens/total": float(r.sum()),
            f"{stream}/samples": float(len(p)),
        }
    )
    return out
