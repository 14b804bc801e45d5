"""From a grounding output to the reasoning stream's visual input: the one home of that step.

ViToS (arXiv 2606.31599, section "Visual token pruning"; docs/design.md section 1, items 2-3):
the grounding stream emits a box, the visual tokens outside it are pruned, the reasoning stream
answers from the kept ones. In this package that is, for one grounding output::

    text --parse_boxes--> boxes --union_box--> box (grounding frame)
         --map_box--> box (reasoning frame) --KeepMask.from_box + prune mode--> keep mask

The trainer's planner (:func:`vitos_verl.trainer.dual_stream.plan_reasoning`), the grounding
reward (:func:`vitos_verl.rewards.score.grounding_score`), the evaluation harness
(:mod:`vitos_verl.eval.runner`) and the rollout dumps all go through :func:`plan` (or, for a box
that is already parsed, :func:`reasoning_input`).

Frames (:class:`Frames`, resolved by :func:`resolve_frames`)
------------------------------------------------------------
Every box is in *resized* pixels of one frame (:class:`~vitos_verl.pruning.ImageGeometry`,
Qwen2.5-VL's ``smart_resize`` of the original image under a pixel budget):

* the *grounding* frame: the image the grounding stream saw; the model's boxes are in it;
* the *reasoning* frame: the image the reasoning stream answers from; keep masks are over its
  28-px cells.

They are one frame (the paper's method) unless low-resolution grounding is on
(``vitos.grounding_max_pixels``): then the grounding image has the smaller budget and a box is
mapped through original pixels (:func:`~vitos_verl.pruning.map_box`) onto the reasoning frame.

Box formats
-----------
The model writes its boxes in ``vitos.box_format`` (:data:`~vitos_verl.pruning.boxes.BOX_FORMATS`:
``abs`` pixels, ``norm1`` fractions in ``[0, 1]``, ``norm1000`` integers 0-1000, all of the
grounding frame's resized image). :func:`plan` parses them in that format and converts them to the
grounding frame's pixels once; everything after (the map onto the reasoning frame, the mask, the
IoU, the dumps, the overlays) is in pixels. :attr:`Plan.box_raw` gives the box back in the
model's own coordinates.

Rules
-----
* prune modes (:data:`PRUNE_MODES`, ``vitos.prune_mode``): ``tokens`` drops the unkept visual
  tokens (the request carries the mask); ``crop`` answers from a crop of the original image that
  covers the kept cells' rectangle (the cheap baseline); ``none`` answers from the full image.
* unparsed boxes (:data:`UNPARSED_BOX_RULES`, ``vitos.unparsed_box``): an output with no box on
  the grounding image (none, unparseable, off the image) keeps every cell (``keep_all``,
  ``no_feedback``) or ``ceil(min_keep_ratio * cells)`` cells, at least one, no margin, around the
  image centre (``keep_min``). The grounding reward charges such an output a keep ratio of 1.0
  under every rule (:attr:`Plan.charged_keep_ratio`).

Pure: the standard library, torch and this package's geometry, masks and box parser; no verl,
vLLM, Ray, PIL or transformers import here (a crop calls the image's own ``crop``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vitos_verl.pruning.boxes import parse_boxes, to_box_format, union_box
from vitos_verl.pruning.geometry import (
    ImageGeometry,
    box_to_original,
    crop_box,
    geometry_from_grid,
    grounding_budget,
    image_geometry,
    map_box,
)
from vitos_verl.pruning.keep_mask import KEEP_ALL, KEEP_KWARG, KeepMask

if TYPE_CHECKING:
    from PIL import Image

#: Rules for a grounding output without a box on the image (module doc, "Rules"). What the
#: grounding sample earns under each is the reward's (:func:`vitos_verl.rewards.score.grounding_score`):
#: ``keep_all`` and ``keep_min`` give it ``w_fb`` times its answers' accuracy, ``no_feedback`` 0.
UNPARSED_BOX_RULES = ("keep_all", "keep_min", "no_feedback")
#: The default rule. Under ``keep_all`` the policy learns to give no box: its answers see the full
#: image, which answers better than a wrong box, so a malformed output outscores a wrong one and
#: the grounding stream's format fell from 0.84 to 0.03 in 4 GRPO steps on the controlled task
#: (docs/learning.md section 3); ``no_feedback`` gives it nothing to gain.
DEFAULT_UNPARSED_BOX = "no_feedback"

#: A crop in original pixels, ``(left, upper, right, lower)``, as ``PIL.Image.crop`` takes it.
CropBox = tuple[int, int, int, int]


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frames:
    """The grounding and reasoning frames of one image (module doc, "Frames").

    Attributes:
        grounding: geometry of the image the grounding stream saw: its boxes are in
            ``grounding.resized_size`` pixels.
        reasoning: geometry of the image the reasoning stream answers from: keep masks are over
            ``reasoning.cell_grid`` (``(rows, cols)`` of 28-px cells, ``grid_thw`` in 14-px patches).

    Raises:
        ValueError: the two geometries are of images of different original sizes.
    """

    grounding: ImageGeometry
    reasoning: ImageGeometry

    def __post_init__(self) -> None:
        if tuple(self.grounding.orig_size) != tuple(self.reasoning.orig_size):
            raise ValueError(
                f"frames of different images: original sizes {self.grounding.orig_size} and {self.reasoning.orig_size}"
            )

    @classmethod
    def same(cls, geom: ImageGeometry) -> Frames:
        """One frame for both streams (the paper's method, or a caller that knows only one frame)."""
        return cls(geom, geom)

    @classmethod
    def of_grids(
        cls,
        image_size: Sequence[int],
        grounding_grid: Sequence[int] | torch.Tensor,
        reasoning_grid: Sequence[int] | torch.Tensor | None = None,
    ) -> Frames:
        """The frames of processor grids: ``image_grid_thw`` rows ``(t, h, w)`` in 14-px patches.

        Args:
            image_size: ``(W, H)`` of the original image, pixels.
            grounding_grid: the grid of the image the grounding stream saw.
            reasoning_grid: the reasoning stream's grid; default ``grounding_grid`` (one frame).
        """
        orig = (int(image_size[0]), int(image_size[1]))
        grounding = geometry_from_grid(grounding_grid, orig_size=orig)
        reasoning = grounding if reasoning_grid is None else geometry_from_grid(reasoning_grid, orig_size=orig)
        return cls(grounding, reasoning)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(W, H)`` of the original image, pixels."""
        return self.reasoning.orig_size

    @property
    def low_resolution(self) -> bool:
        """Whether the grounding image is resized differently from the reasoning one."""
        return self.grounding.resized_size != self.reasoning.resized_size


def resolve_frames(
    image_size: Sequence[int],
    min_pixels: int,
    max_pixels: int,
    grounding_max_pixels: int | None = None,
    grounding_grid: Sequence[int] | torch.Tensor | None = None,
) -> Frames:
    """The two frames of one image from the config's pixel budgets (and what the processor gave).

    Args:
        image_size: ``(W, H)`` of the original image, pixels (``extra_info.image_size``).
        min_pixels, max_pixels: the reasoning stream's budget (``data.min_pixels`` /
            ``data.max_pixels``, or the processor's own), pixels.
        grounding_max_pixels: ``vitos.grounding_max_pixels``: None (one frame) or the grounding
            stream's smaller budget (:func:`~vitos_verl.pruning.grounding_budget`).
        grounding_grid: ``image_grid_thw`` row ``(t, h, w)`` the processor gave the grounding
            sample; when given it is the grounding frame (what the model saw) and, without
            low-resolution grounding, the reasoning frame too. Else both are computed with
            ``smart_resize`` (transformers' Qwen2-VL image processor, the one vLLM and verl run).

    Returns:
        :class:`Frames`.

    Raises:
        ValueError: non-positive sizes, ``grounding_max_pixels`` below one 28x28 cell or above
            ``max_pixels`` (:func:`~vitos_verl.pruning.grounding_budget`).
    """
    w, h = int(image_size[0]), int(image_size[1])
    g_min, g_max = grounding_budget(min_pixels, max_pixels, grounding_max_pixels)
    if grounding_grid is not None:
        grounding = geometry_from_grid(grounding_grid, orig_size=(w, h))
    else:
        grounding = image_geometry(w, h, g_min, g_max)
    if grounding_max_pixels is None:
        return Frames.same(grounding)
    return Frames(grounding, image_geometry(w, h, min_pixels, max_pixels))


# --------------------------------------------------------------------------- prune modes


def _tokens(geom: ImageGeometry, mask: KeepMask) -> tuple[KeepMask, CropBox | None]:
    return mask, None


def _crop(geom: ImageGeometry, mask: KeepMask) -> tuple[KeepMask, CropBox | None]:
    r0, r1, c0, c1 = mask.bounds()
    rect = torch.zeros(mask.cell_grid, dtype=torch.bool)
    rect[r0:r1, c0:c1] = True  # the crop sees the whole rectangle of the kept cells
    return KeepMask(rect), crop_box(mask, geom)


def _none(geom: ImageGeometry, mask: KeepMask) -> tuple[KeepMask, CropBox | None]:
    return KeepMask.keep_all(mask.cell_grid), None


#: ``vitos.prune_mode`` -> ``(reasoning frame, the box's mask) -> (cells the answer sees, crop or
#: None)`` (module doc, "Rules").
PRUNE_MODES: dict[str, Callable[[ImageGeometry, KeepMask], tuple[KeepMask, CropBox | None]]] = {
    "tokens": _tokens,
    "crop": _crop,
    "none": _none,
}


def check_rules(prune_mode: str, unparsed_box: str) -> None:
    """Raise ``ValueError`` for a prune mode not in :data:`PRUNE_MODES` or a rule not in :data:`UNPARSED_BOX_RULES`."""
    if prune_mode not in PRUNE_MODES:
        raise ValueError(f"unknown prune mode {prune_mode!r}; choose one of {sorted(PRUNE_MODES)}")
    if unparsed_box not in UNPARSED_BOX_RULES:
        raise ValueError(f"unknown unparsed_box rule {unparsed_box!r}; choose one of {UNPARSED_BOX_RULES}")


def visible_cells(
    prune_mode: str,
    geom: ImageGeometry,
    box: Sequence[float] | None,
    margin_cells: int = 0,
    min_keep_ratio: float = 0.0,
    unparsed_box: str = DEFAULT_UNPARSED_BOX,
) -> tuple[KeepMask, CropBox | None]:
    """The cells the reasoning stream sees for one box (None: no box on the image), and the crop.

    Args:
        prune_mode: a key of :data:`PRUNE_MODES`.
        geom: the reasoning frame.
        box: ``[x1, y1, x2, y2]`` in ``geom``'s resized pixels, or None.
        margin_cells: cells of dilation around the box, ``>= 0``.
        min_keep_ratio: lower bound on the kept fraction, in ``[0, 1]``
            (:func:`~vitos_verl.pruning.box_to_keep_mask`'s growth rule).
        unparsed_box: the rule for ``box=None`` (:data:`UNPARSED_BOX_RULES`).

    Returns:
        ``(mask, crop)``: :class:`~vitos_verl.pruning.KeepMask` over ``geom.cell_grid`` (the crop's
        rectangle in ``crop`` mode, every cell in ``none`` mode), and the crop in original pixels
        (``(left, upper, right, lower)``) in ``crop`` mode, else None.

    Raises:
        ValueError: unknown mode or rule, negative margin, ratio outside ``[0, 1]``, non-finite box.
    """
    check_rules(prune_mode, unparsed_box)
    if box is None and unparsed_box == "keep_min":
        cx, cy = geom.resized_size[0] / 2, geom.resized_size[1] / 2
        box, margin_cells = [cx, cy, cx, cy], 0  # a point: the cell that holds it, then growth
    return PRUNE_MODES[prune_mode](geom, KeepMask.from_box(box, geom.cell_grid, margin_cells, min_keep_ratio))


@dataclass
class ReasoningInput:
    """The reasoning stream's visual input made from one grounding box.

    Attributes:
        image: the image the reasoning prompt carries (the original, or the crop); None where
            the caller had none (token and ``none`` modes do not need it).
        keep_mask: the :class:`~vitos_verl.pruning.KeepMask` over the *original* image's cells in
            the reasoning frame: the cells the answer sees (the crop's rectangle in crop mode;
            every cell unpruned). ``keep_mask.ratio`` is the keep ratio.
        vitos_keep: what the vLLM request carries as ``mm_processor_kwargs[KEEP_KWARG]``: the
            mask's text in token mode (:meth:`~vitos_verl.pruning.KeepMask.request_value`),
            :data:`~vitos_verl.pruning.KEEP_ALL` (``""``) otherwise.
    """

    image: Image.Image | None
    keep_mask: KeepMask
    vitos_keep: str = KEEP_ALL

    @property
    def keep_ratio(self) -> float:
        """Fraction of the original image's visual tokens the reasoning stream sees."""
        return self.keep_mask.ratio

    @property
    def mm_processor_kwargs(self) -> dict[str, Any]:
        """The request's ``mm_processor_kwargs`` (empty when nothing is pruned)."""
        return {KEEP_KWARG: self.vitos_keep} if self.vitos_keep else {}


def _input(prune_mode: str, image: Image.Image | None, mask: KeepMask, crop: CropBox | None) -> ReasoningInput:
    if prune_mode == "crop":
        if image is None:
            raise ValueError("crop mode needs the image to crop")
        return ReasoningInput(image.crop(crop), mask)
    return ReasoningInput(image, mask, mask.request_value() if prune_mode == "tokens" else KEEP_ALL)


def reasoning_input(
    mode: str,
    image: Image.Image | None,
    geom: ImageGeometry,
    box_resized: Sequence[float] | None,
    margin_cells: int = 0,
    min_keep_ratio: float = 0.0,
    unparsed_box: str = DEFAULT_UNPARSED_BOX,
) -> ReasoningInput:
    """The reasoning input for one box that is already parsed and in the reasoning frame.

    For a grounding output's text use :func:`plan`; this is for boxes from elsewhere (a record's
    box, the ground truth of an oracle).

    Args:
        mode: a key of :data:`PRUNE_MODES`.
        image: the original image (``geom.orig_size``; PIL); only ``crop`` mode needs it.
        geom: the reasoning frame.
        box_resized: ``[x1, y1, x2, y2]`` in ``geom``'s resized pixels, or None (no box: see
            ``unparsed_box``).
        margin_cells, min_keep_ratio, unparsed_box: as :func:`visible_cells`.

    Raises:
        ValueError: as :func:`visible_cells`, or ``crop`` mode without an image.
    """
    mask, crop = visible_cells(mode, geom, box_resized, margin_cells, min_keep_ratio, unparsed_box)
    return _input(mode, image, mask, crop)


# --------------------------------------------------------------------------- the plan


class PlanSettings(Protocol):
    """What :func:`plan` reads of a config: :class:`PlanConfig`, or the trainer's ``ViToSConfig``."""

    prune_mode: str
    box_format: str
    margin_cells: int
    min_keep_ratio: float
    unparsed_box: str


@dataclass(frozen=True)
class PlanConfig:
    """The ``vitos`` keys of the box-to-mask rule, for callers without a trainer config.

    Attributes:
        prune_mode: a key of :data:`PRUNE_MODES`.
        box_format: the frame of the model's boxes: ``abs`` (resized pixels), ``norm1`` (0-1),
            ``norm1000`` (0-1000) (:func:`~vitos_verl.pruning.boxes.parse_boxes`).
        margin_cells: cells of dilation around a box, ``>= 0``.
        min_keep_ratio: never keep fewer than this fraction of the cells, in ``[0, 1]``.
        unparsed_box: a key of :data:`UNPARSED_BOX_RULES`.

    Raises:
        ValueError: an unknown prune mode or rule.
    """

    prune_mode: str = "tokens"
    box_format: str = "abs"
    margin_cells: int = 0
    min_keep_ratio: float = 0.0
    unparsed_box: str = DEFAULT_UNPARSED_BOX

    def __post_init__(self) -> None:
        check_rules(self.prune_mode, self.unparsed_box)


@dataclass(frozen=True)
class Plan:
    """What one grounding output gives the reasoning stream.

    Attributes:
        frames: the grounding and reasoning frames the plan is in.
        prune_mode: the prune mode applied (:data:`PRUNE_MODES`).
        box_grounding: the union of the output's boxes that cover part of the grounding image,
            ``[x1, y1, x2, y2]`` floats in the *grounding* frame's resized pixels (as the model
            emitted it), or None where the output held no such box.
        box_reasoning: the same box mapped onto the *reasoning* frame's resized pixels
            (:func:`~vitos_verl.pruning.map_box`; equal when the frames agree), or None.
        keep_mask: :class:`~vitos_verl.pruning.KeepMask`, bool ``(rows, cols)`` over
            ``frames.reasoning.cell_grid``: the cells the reasoning stream sees (the prune mode
            and, without a box, the unparsed-box rule applied).
        crop: in ``crop`` mode, the crop of the original image, ``(left, upper, right, lower)``
            original pixels; else None.
        box_format: the format the output's boxes were parsed in (``vitos.box_format``);
            :attr:`box_raw` is :attr:`box_grounding` written in it.
    """

    frames: Frames
    prune_mode: str
    box_grounding: list[float] | None
    box_reasoning: list[float] | None
    keep_mask: KeepMask
    crop: CropBox | None = None
    box_format: str = "abs"

    @property
    def parsed(self) -> bool:
        """Whether the output held a box on the grounding image."""
        return self.box_grounding is not None

    @property
    def keep_ratio(self) -> float:
        """Kept cells over the reasoning image's cells, in ``(0, 1]``: what the answers see."""
        return self.keep_mask.ratio

    @property
    def charged_keep_ratio(self) -> float:
        """The keep ratio the grounding reward charges: :attr:`keep_ratio` for a parsed box, 1.0
        (the whole image) without one, whatever the unparsed-box rule showed the answers."""
        return self.keep_ratio if self.parsed else 1.0

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """``(t, h, w)`` in 14-px patches of the reasoning image (the mask's frame)."""
        return self.frames.reasoning.grid_thw

    @property
    def box_original(self) -> list[float] | None:
        """:attr:`box_grounding` in *original* pixels (:func:`~vitos_verl.pruning.box_to_original`), or None."""
        return None if self.box_grounding is None else box_to_original(self.box_grounding, self.frames.grounding)

    @property
    def box_raw(self) -> list[float] | None:
        """:attr:`box_grounding` in the model's own coordinates (:attr:`box_format` of the grounding
        frame's resized image: pixels, ``[0, 1]`` or 0-1000), clipped to the image, or None."""
        if self.box_grounding is None:
            return None
        return to_box_format(self.box_grounding, self.box_format, self.frames.grounding.resized_size)

    @property
    def vitos_keep(self) -> str:
        """The request's value of :data:`~vitos_verl.pruning.KEEP_KWARG`: the mask's text in
        ``tokens`` mode (:data:`~vitos_verl.pruning.KEEP_ALL`, ``""``, when it keeps every cell),
        ``""`` in the other modes (their image is not pruned)."""
        return self.keep_mask.request_value() if self.prune_mode == "tokens" else KEEP_ALL

    def reasoning_input(self, image: Image.Image | None = None) -> ReasoningInput:
        """The reasoning stream's input: ``image`` (the original, PIL), cropped in ``crop`` mode.

        Raises:
            ValueError: ``crop`` mode without an image.
        """
        return _input(self.prune_mode, image, self.keep_mask, self.crop)


def plan(text: str, frames: Frames, config: PlanSettings) -> Plan:
    """Parse one grounding output and plan the reasoning stream's visual input (module doc).

    Steps: every box of ``text`` in ``config.box_format``, clipped to the grounding image
    (:func:`~vitos_verl.pruning.boxes.parse_boxes`; boxes off the image are dropped); their union
    (:func:`~vitos_verl.pruning.boxes.union_box`), the predicted box; mapped onto the reasoning
    frame; the cells it overlaps, dilated by ``margin_cells`` and grown to ``min_keep_ratio``
    (:func:`~vitos_verl.pruning.box_to_keep_mask`), or the ``unparsed_box`` rule without a box;
    then the prune mode.

    Args:
        text: the decoded grounding response (model output: it never raises for its content).
        frames: the image's frames (:func:`resolve_frames`).
        config: ``prune_mode``, ``box_format``, ``margin_cells``, ``min_keep_ratio``,
            ``unparsed_box`` (:class:`PlanConfig` or the trainer's ``ViToSConfig``).

    Returns:
        :class:`Plan`.

    Raises:
        ValueError: configuration errors only: unknown prune mode, rule or box format, negative
            margin, ratio outside ``[0, 1]``.
    """
    check_rules(config.prune_mode, config.unparsed_box)
    boxes = parse_boxes(text, box_format=config.box_format, image_size=frames.grounding.resized_size)
    box_g = [float(v) for v in union_box(boxes)] if boxes else None
    box_r = map_box(box_g, frames.grounding, frames.reasoning) if box_g is not None else None
    mask, crop = visible_cells(
        config.prune_mode, frames.reasoning, box_r, config.margin_cells, config.min_keep_ratio, config.unparsed_box
    )
    return Plan(frames, config.prune_mode, box_g, box_r, mask, crop, config.box_format)


__all__ = [
    "PRUNE_MODES",
    "UNPARSED_BOX_RULES",
    "CropBox",
    "Frames",
    "Plan",
    "PlanConfig",
    "PlanSettings",
    "ReasoningInput",
    "check_rules",
    "plan",
    "reasoning_input",
    "resolve_frames",
    "visible_cells",
]
