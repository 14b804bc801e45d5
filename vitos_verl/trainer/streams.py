"""What varies between ViToS runs, as registries keyed by name: stream orders and prune modes,
plus the cross-feedback that couples the two streams.

* :data:`STREAM_ORDERS`: the policy updates of one step, each a tuple of streams whose samples
  share one loss (``joint`` puts both in one update: the summed-loss ablation).
* :data:`PRUNE_MODES`: how a grounding box becomes the reasoning stream's visual input.
* :func:`cross_feedback`: the mean accuracy of the answers made from each box (the ``w_fb``
  term of the grounding reward, docs/design.md section 1, item 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitos_verl.pruning import KEEP_ALL, KEEP_KWARG, ImageGeometry, KeepMask, crop_box
from vitos_verl.rewards.score import UNPARSED_BOX_RULES

STREAM_ORDERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "grounding_first": (("grounding",), ("reasoning",)),
    "reasoning_first": (("reasoning",), ("grounding",)),
    "joint": (("grounding", "reasoning"),),
}


def update_stages(order: str) -> tuple[tuple[str, ...], ...]:
    """Policy updates of one training step, in order (e.g. ``(("grounding",), ("reasoning",))``).

    Raises:
        ValueError: unknown order.
    """
    if order not in STREAM_ORDERS:
        raise ValueError(f"unknown stream order {order!r}; choose one of {sorted(STREAM_ORDERS)}")
    return STREAM_ORDERS[order]


@dataclass
class ReasoningInput:
    """The reasoning stream's visual input made from one grounding box.

    Attributes:
        image: the image the reasoning prompt carries (the original, or the crop).
        keep_mask: the :class:`~vitos_verl.pruning.KeepMask` over the *original* image's cells in
            the reasoning frame: the cells the answer sees (the crop's rectangle in crop mode;
            every cell unpruned). ``keep_mask.ratio`` is the keep ratio.
        vitos_keep: what the vLLM request carries as ``mm_processor_kwargs[KEEP_KWARG]``: the
            mask's text in token mode, :data:`~vitos_verl.pruning.KEEP_ALL` otherwise.
    """

    image: Image.Image
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


PruneFn = Callable[[Image.Image, ImageGeometry, KeepMask], ReasoningInput]


def _tokens(image: Image.Image, geom: ImageGeometry, mask: KeepMask) -> ReasoningInput:
    return ReasoningInput(image, mask, mask.request_value())


def _crop(image: Image.Image, geom: ImageGeometry, mask: KeepMask) -> ReasoningInput:
    r0, r1, c0, c1 = mask.bounds()
    rect = torch.zeros(mask.cell_grid, dtype=torch.bool)
    rect[r0:r1, c0:c1] = True  # the crop sees the whole rectangle of the kept cells
    return ReasoningInput(image.crop(crop_box(mask, geom)), KeepMask(rect))


def _none(image: Image.Image, geom: ImageGeometry, mask: KeepMask) -> ReasoningInput:
    return ReasoningInput(image, KeepMask.keep_all(mask.cell_grid))


PRUNE_MODES: dict[str, PruneFn] = {"tokens": _tokens, "crop": _crop, "none": _none}


def reasoning_input(
    mode: str,
    image: Image.Image,
    geom: ImageGeometry,
    box_resized: Sequence[float] | None,
    margin_cells: int = 0,
    min_keep_ratio: float = 0.0,
    unparsed_box: str = "keep_all",
) -> ReasoningInput:
    """The reasoning input for one parsed box (None: no box on the image, see ``unparsed_box``).

    Args:
        mode: a key of :data:`PRUNE_MODES`.
        image: the original image (``geom.orig_size``).
        box_resized: ``[x1, y1, x2, y2]`` in resized pixels, or None.
        unparsed_box: the rule for ``box_resized=None``
            (:data:`vitos_verl.rewards.score.UNPARSED_BOX_RULES`): ``keep_all`` and
            ``no_feedback`` keep every cell; ``keep_min`` keeps ``ceil(min_keep_ratio * cells)``
            cells (at least one, no margin) around the image centre.

    Raises:
        ValueError: unknown mode or rule.
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown prune mode {mode!r}; choose one of {sorted(PRUNE_MODES)}")
    if unparsed_box not in UNPARSED_BOX_RULES:
        raise ValueError(f"unknown unparsed_box rule {unparsed_box!r}; choose one of {UNPARSED_BOX_RULES}")
    if box_resized is None and unparsed_box == "keep_min":
        cx, cy = geom.resized_size[0] / 2, geom.resized_size[1] / 2
        box_resized, margin_cells = [cx, cy, cx, cy], 0  # a point: the cell that holds it, then growth
    return PRUNE_MODES[mode](image, geom, KeepMask.from_box(box_resized, geom.cell_grid, margin_cells, min_keep_ratio))


def cross_feedback(answer_acc: Sequence[float], answer_box: Sequence[int], n_boxes: int) -> np.ndarray:
    """Mean accuracy of the reasoning answers made from each grounding box.

    Args:
        answer_acc: accuracy of each reasoning answer, ``(N_r,)`` floats in ``[0, 1]``.
        answer_box: index of the grounding sample whose box each answer used, ``(N_r,)`` ints
            in ``[0, n_boxes)``.
        n_boxes: number of grounding samples.

    Returns:
        ``(n_boxes,)`` float64; a box with no answer gets 0 (no evidence it helped).

    Raises:
        ValueError: mismatched lengths or an index out of range.

    >>> cross_feedback([1, 0, 1, 1], [0, 0, 1, 1], 3).tolist()
    [0.5, 1.0, 0.0]
    """
    acc = np.asarray(answer_acc, dtype=np.float64)
    idx = np.asarray(answer_box, dtype=np.int64)
    if acc.shape != idx.shape:
        raise ValueError(f"{acc.shape[0]} accuracies for {idx.shape[0]} box indices")
    if idx.size and (idx.min() < 0 or idx.max() >= n_boxes):
        raise ValueError(f"box index out of range [0, {n_boxes})")
    total = np.bincount(idx, weights=acc, minlength=n_boxes)
    count = np.bincount(idx, minlength=n_boxes)
    return np.divide(total, count, out=np.zeros(n_boxes), where=count > 0)
