"""The ``vitos`` block of the trainer config: the method's knobs, checked once at start-up.

Defaults are this project's choices (the paper's values are not public); recipes override
only what differs. Every invalid combination raises a ``ValueError`` that says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vitos_verl.pruning.boxes import BOX_FORMATS
from vitos_verl.pruning.plan import DEFAULT_UNPARSED_BOX, PRUNE_MODES, UNPARSED_BOX_RULES
from vitos_verl.records import STREAMS
from vitos_verl.rewards.score import FEEDBACK_SCALES
from vitos_verl.trainer.streams import STREAM_ORDERS, check_update_streams, update_stages


@dataclass(frozen=True)
class ViToSConfig:
    """ViToS settings (docs/design.md section 1).

    Attributes:
        order: ``grounding_first`` | ``reasoning_first`` | ``joint`` (one summed loss: the ablation).
        n_g: grounding samples (boxes) per question.
        n_r: reasoning answers per box; each question gets ``n_g * n_r`` answers.
        w_iou, w_fb, w_fmt, w_keep: reward weights (see :mod:`vitos_verl.rewards.score`);
            ``w_fb = 0`` disables cross-feedback (ablation).
        w_acc: weight of the grounding output's *own* answer in the grounding reward (default 0.0:
            the grounding stream only boxes). Above 0 the grounding prompt also asks for the answer
            (``<think>..</think><box>[..]</box><answer>..</answer>``, the output of the authors'
            stage 1: README of github.com/JLINEkai/ViToS), the answer is scored like the reasoning
            stream's against the ground truth, and the grounding format needs it. One switch: the
            prompt asks for the answer exactly when ``w_acc > 0`` (:attr:`grounding_answer`).
        margin_cells: cells of dilation around a box.
        min_keep_ratio: never keep fewer than this fraction of the visual tokens.
        prune_mode: ``tokens`` (drop visual tokens) | ``crop`` (box crop) | ``none`` (full image)
            (:data:`vitos_verl.pruning.plan.PRUNE_MODES`).
        box_format: the coordinates the model writes its boxes in, and the grounding prompt asks
            for: ``abs`` (pixels of the resized image the grounding stream sees), ``norm1``
            (fractions in ``[0, 1]`` of that image's width and height; the authors' "normalized
            evidence boxes"), ``norm1000`` (integers 0-1000 of the same, Qwen2-VL's convention)
            (:data:`vitos_verl.pruning.boxes.BOX_FORMATS`). The one switch of the prompt, the SFT
            targets, the rewards, the planner, the evaluation and the dumps; the dataset reads it
            as ``data.box_format`` (:func:`vitos_verl.trainer.checks.check_grounding_prompt`).
        iou_mode: ``best`` or ``union`` over several ground-truth boxes.
        unparsed_box: what a grounding output without a box on the image (none, unparseable,
            off the image) gives: ``no_feedback`` (the default: the reasoning answers see the full
            image, the sample earns no feedback), ``keep_all`` (full image; the sample earns
            ``w_fb`` times their accuracy, which a policy learns to exploit by giving no box),
            ``keep_min`` (they see
            ``ceil(min_keep_ratio * cells)`` cells, at least one, no margin, at the image centre;
            feedback as ``keep_all``). Never IoU or format
            credit; keep ratio charged 1.0 (:data:`vitos_verl.pruning.plan.UNPARSED_BOX_RULES`).
        grounding_max_pixels: pixel budget of the grounding stream's image (low-resolution
            grounding, beyond the paper; docs/design.md section 1e), or None (the default, the paper's
            method): the grounding stream sees the image at ``data.max_pixels`` like the reasoning
            stream. When set, the grounding prompt's image is resized to this smaller budget, its
            boxes (and the IoU reward) are in that frame, and each box is mapped through original
            pixels (:func:`vitos_verl.pruning.map_box`) onto the full-budget cell grid, whose kept
            tokens the reasoning stream answers from.
        reward_timeout_s: seconds one reward call may take; past it the sample scores 0 and
            counts as failed (:mod:`vitos_verl.rewards.guard`).
        optim_steps: optimiser steps per PPO epoch of each stream's update, ``{grounding: int |
            None, reasoning: int | None}``; None takes ``train_batch_size // ppo_mini_batch_size``
            (the count verl gives the grounding stream), so both streams take the same number of
            steps by default and each reasoning mini-batch holds ``n_r`` times the samples of a
            grounding one. ``order: joint`` (one update) needs both to resolve to the same count.
        update_streams: the streams whose samples update the policy, a non-empty subset of
            :data:`vitos_verl.records.STREAMS` (default both). ``[grounding]`` is a stage-1 run of
            the authors' two-stage schedule, ``[reasoning]`` a stage-2 run; both streams are still
            generated and scored every step (the rewards are logged; cross-feedback needs the
            answers, the answers need the boxes), but a stream left out is not updated and gets no
            old-log-prob or reference pass (:func:`vitos_verl.trainer.streams.update_stages`).
        shuffle_rewards: the control of a learning run (off in every method recipe): after both
            streams are scored, each stream's per-sample rewards are permuted at random across
            that step's samples before the advantages (seeded by the step), so the update sees
            rewards of the right scale and spread but unrelated to its samples; the logged
            rewards stay the true ones. A run that rises with it on learns from something other
            than the reward (the warm start, the KL term, the schedule).
        feedback_scale: ``none`` (the paper's cross-feedback, ``w_fb`` times the answers'
            accuracy) or ``pruned`` (times ``1 - keep_ratio`` as well: the box is credited for the
            tokens it pruned, so the whole image earns no feedback;
            :func:`vitos_verl.rewards.score.grounding_score`).
        mask_malformed: samples whose output fails its stream's template (``format == 0``: a
            grounding output without a well-formed box, an answer outside ``<answer>``) stay in
            their GRPO group, so the well-formed samples beside them get the higher advantage,
            but are taken out of the loss: their tokens are not pushed down. Pushed down at a
            learning rate that moves the policy (1e-3 for the ``learn`` size), garbage samples
            raised garbage tokens until every output was malformed (docs/learning.md section 3).
    """

    order: str = "grounding_first"
    n_g: int = 4
    n_r: int = 2
    w_iou: float = 1.0
    w_fb: float = 1.0
    w_fmt: float = 0.5
    w_keep: float = 0.0
    w_acc: float = 0.0
    margin_cells: int = 1
    min_keep_ratio: float = 0.0
    prune_mode: str = "tokens"
    box_format: str = "abs"
    iou_mode: str = "best"
    unparsed_box: str = DEFAULT_UNPARSED_BOX
    feedback_scale: str = "none"
    reward_timeout_s: float = 30.0
    grounding_max_pixels: int | None = None
    optim_steps: Mapping[str, int | None] = field(default_factory=lambda: dict.fromkeys(STREAMS))
    shuffle_rewards: bool = False
    mask_malformed: bool = False
    update_streams: tuple[str, ...] = STREAMS

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "update_streams", check_update_streams(self.update_streams))
        steps = dict(self.optim_steps or {})
        if set(steps) - set(STREAMS):
            raise ValueError(f"vitos.optim_steps keys {sorted(set(steps) - set(STREAMS))} unknown; known: {list(STREAMS)}")
        for name, v in steps.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"vitos.optim_steps.{name}={v!r} must be a positive integer or null (verl's count)")
        object.__setattr__(self, "optim_steps", {s: steps.get(s) for s in STREAMS})
        if self.order not in STREAM_ORDERS:
            raise ValueError(f"vitos.order={self.order!r}: choose one of {sorted(STREAM_ORDERS)}")
        if self.prune_mode not in PRUNE_MODES:
            raise ValueError(f"vitos.prune_mode={self.prune_mode!r}: choose one of {sorted(PRUNE_MODES)}")
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"vitos.box_format={self.box_format!r}: choose one of {BOX_FORMATS}")
        if self.iou_mode not in ("best", "union"):
            raise ValueError(f"vitos.iou_mode={self.iou_mode!r}: choose 'best' or 'union'")
        if self.feedback_scale not in FEEDBACK_SCALES:
            raise ValueError(f"vitos.feedback_scale={self.feedback_scale!r}: choose one of {FEEDBACK_SCALES}")
        if self.unparsed_box not in UNPARSED_BOX_RULES:
            raise ValueError(f"vitos.unparsed_box={self.unparsed_box!r}: choose one of {UNPARSED_BOX_RULES}")
        if self.n_g < 2 or self.n_r < 1:
            raise ValueError(
                f"vitos.n_g={self.n_g} must be >= 2 and vitos.n_r={self.n_r} >= 1: GRPO normalises a question's "
                "boxes within their group (and its n_g * n_r answers within theirs); a group of one has zero advantage"
            )
        if not 0.0 <= self.min_keep_ratio <= 1.0:
            raise ValueError(f"vitos.min_keep_ratio={self.min_keep_ratio} must be in [0, 1]")
        if self.margin_cells < 0:
            raise ValueError(f"vitos.margin_cells={self.margin_cells} must be >= 0")
        for name in ("w_iou", "w_fb", "w_fmt", "w_keep", "w_acc"):
            if getattr(self, name) < 0:
                raise ValueError(f"vitos.{name}={getattr(self, name)} must be >= 0 (w_keep is subtracted)")
        g = self.grounding_max_pixels
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 28 * 28):
            raise ValueError(f"vitos.grounding_max_pixels={g!r} must be null or an integer >= 784 (one 28x28 cell)")
        if not self.reward_timeout_s > 0:
            raise ValueError(f"vitos.reward_timeout_s={self.reward_timeout_s} must be > 0 (seconds one reward call may take)")

    def _check_types(self) -> None:
        """Numbers are finite numbers (ints where counts are meant), names are strings.

        ``w_iou=nan`` would turn every grounding score into nan, then 0; ``n_g='4'`` would fail
        later with a ``TypeError`` about ``<``. Integers given for float fields become floats.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"vitos.{f.name}={value!r} must be an integer")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"vitos.{f.name}={value!r} must be a finite number")
                object.__setattr__(self, f.name, float(value))
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"vitos.{f.name}={value!r} must be true or false")
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"vitos.{f.name}={value!r} must be a string")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> ViToSConfig:
        """Build from a dict / OmegaConf node; unknown keys are an error (typos do not pass silently)."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown vitos config keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    @property
    def grounding_answer(self) -> bool:
        """Whether the grounding prompt asks for the answer after the box (``w_acc > 0``)."""
        return self.w_acc > 0

    def stages(self) -> tuple[tuple[str, ...], ...]:
        """The policy updates of one step: ``vitos.order`` restricted to ``vitos.update_streams``
        (:func:`vitos_verl.trainer.streams.update_stages`)."""
        return update_stages(self.order, self.update_streams)

    def grounding_pixels(self, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of the grounding stream's image: the data's budget, or the
        low-resolution one (``grounding_max_pixels``; ``min_pixels`` clipped to it).

        Raises:
            ValueError: ``grounding_max_pixels`` above ``max_pixels`` (it would upsample).
        """
        from vitos_verl.pruning import grounding_budget

        return grounding_budget(min_pixels, max_pixels, self.grounding_max_pixels)

    def reward_kwargs(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """Keyword arguments of :func:`vitos_verl.rewards.compute_score` for this config."""
        keys = (
            "w_iou", "w_fb", "w_fmt", "w_keep", "w_acc", "iou_mode", "box_format", "margin_cells", "min_keep_ratio", "unparsed_box",
            "feedback_scale", "reward_timeout_s",
        )  # fmt: skip
        out = {k: v for k, v in asdict(self).items() if k in keys}
        return {**out, "min_pixels": min_pixels, "max_pixels": max_pixels}

    def check_batch(self, train_batch_size: int, ppo_mini_batch_size: int) -> None:
        """Each update's mini-batches must hold the samples of a whole number of questions.

        Raises:
            ValueError: ``ppo_mini_batch_size`` (questions) does not divide ``train_batch_size``,
                or an update's optimiser steps (:meth:`update_optim_steps`) do not.
        """
        if train_batch_size <= 0 or ppo_mini_batch_size <= 0:
            raise ValueError("train_batch_size and ppo_mini_batch_size must be positive")
        if train_batch_size % ppo_mini_batch_size:
            raise ValueError(
                f"data.train_batch_size={train_batch_size} must be a multiple of actor.ppo_mini_batch_size="
                f"{ppo_mini_batch_size} (questions per mini-batch; each stream expands it by n_g or n_g*n_r)"
            )
        for name, steps in self.update_optim_steps(train_batch_size, ppo_mini_batch_size).items():
            if train_batch_size % steps:
                raise ValueError(
                    f"the {name} update's {steps} optimiser steps (vitos.optim_steps) must divide "
                    f"data.train_batch_size={train_batch_size}: each mini-batch holds the samples of "
                    "train_batch_size / steps questions"
                )

    def update_optim_steps(self, train_batch_size: int, ppo_mini_batch_size: int) -> dict[str, int]:
        """Optimiser steps per PPO epoch of each update of a training step.

        Args:
            train_batch_size: questions per step (``data.train_batch_size``).
            ppo_mini_batch_size: questions per verl mini-batch (``actor.ppo_mini_batch_size``);
                ``train_batch_size // ppo_mini_batch_size`` is the default count.

        Returns:
            ``{update name: steps}`` in update order, only the updates of ``update_streams``;
            names as the trainer logs them (``grounding``, ``reasoning``, or
            ``grounding+reasoning`` for ``order: joint``).

        Raises:
            ValueError: ``order: joint`` with streams that resolve to different counts.
        """
        default = max(train_batch_size // ppo_mini_batch_size, 1)
        per_stream = {s: self.optim_steps[s] or default for s in STREAMS}
        out = {}
        for stage in self.stages():
            counts = {per_stream[s] for s in stage}
            if len(counts) > 1:
                raise ValueError(
                    f"vitos.order={self.order!r} updates {'+'.join(stage)} at once: vitos.optim_steps {per_stream} "
                    "must resolve to one count"
                )
            out["+".join(stage)] = counts.pop()
        return out
