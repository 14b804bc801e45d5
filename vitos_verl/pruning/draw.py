"""Pictures of a keep mask: the 28x28 cells the reasoning stream sees, drawn over the image.

Unkept cells are dimmed, kept cells outlined, the box drawn in red; the picture is in original
pixels (cells mapped back from the resized frame with the processor's scale,
:func:`vitos_verl.pruning.box_to_original`). Used by the trainer's validation table
(:mod:`vitos_verl.trainer.rollout_dump`) and by the overlay tool and report
(:mod:`vitos_verl.eval.overlay`, :mod:`vitos_verl.eval.report_cards`). PIL and this package's
geometry only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

from vitos_verl.pruning.geometry import CELL, ImageGeometry, box_to_original, geometry_from_grid, map_box
from vitos_verl.pruning.keep_mask import KEEP_ALL, KeepMask


def draw_overlay(
    image: Image.Image, mask: KeepMask | torch.Tensor, geom: ImageGeometry, box_resized: Sequence[float] | None = None, dim: float = 0.35
) -> Image.Image:
    """RGB copy of ``image`` (original size) with the keep mask drawn on it.

    Args:
        image: the original image.
        mask: :class:`~vitos_verl.pruning.KeepMask` (or its bool ``(rows, cols)`` grid) over
            ``geom.cell_grid``.
        geom: the image's geometry (:func:`vitos_verl.pruning.image_geometry`).
        box_resized: optional ``[x1, y1, x2, y2]`` in resized pixels, drawn in red.
        dim: brightness of unkept cells, in ``[0, 1]``.

    Raises:
        ValueError: mask shape differs from the geometry's cell grid, or the image size from
            ``geom.orig_size``.
    """
    mask = getattr(mask, "cells", mask)
    if tuple(mask.shape) != geom.cell_grid:
        raise ValueError(f"mask shape {tuple(mask.shape)} != cell grid {geom.cell_grid}")
    if image.size != geom.orig_size:
        raise ValueError(f"image size {image.size} != geometry's original size {geom.orig_size}")
    base = image.convert("RGB")
    dark = Image.eval(base, lambda v: int(v * dim))
    keep_layer = Image.new("L", base.size, 0)
    draw_keep = ImageDraw.Draw(keep_layer)
    cells = []
    for r, c in mask.nonzero().tolist():
        x1, y1, x2, y2 = box_to_original([c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL], geom)
        cells.append((x1, y1, x2, y2))
        draw_keep.rectangle([x1, y1, x2, y2], fill=255)
    out = Image.composite(base, dark, keep_layer)
    draw = ImageDraw.Draw(out)
    for x1, y1, x2, y2 in cells:
        draw.rectangle([x1, y1, x2, y2], outline=(255, 220, 0))
    if box_resized is not None:
        draw.rectangle(box_to_original(box_resized, geom), outline=(255, 0, 0), width=max(1, image.size[0] // 256))
    return out


def draw_rollout(image: Image.Image, row: Mapping[str, Any]) -> Image.Image:
    """:func:`draw_overlay` of one rollout JSONL line (:mod:`vitos_verl.trainer.rollout_dump`).

    Uses the line's ``grid_thw`` and ``image_size`` (original ``[W, H]`` pixels) for the frame of
    its ``box`` (resized pixels; none drawn when null), and its ``keep_mask`` (every cell when
    absent) on the mask's own grid: the same frame, or the full-budget one under low-resolution
    grounding (the box is mapped onto it, :func:`vitos_verl.pruning.map_box`). An image whose
    size differs from ``image_size`` is resized to it first.

    Raises:
        ValueError: a malformed ``keep_mask``.
    """
    size = (int(row["image_size"][0]), int(row["image_size"][1]))
    geom = geometry_from_grid(row["grid_thw"], orig_size=size)
    mask = KeepMask.decode(row.get("keep_mask") or KEEP_ALL, geom.cell_grid)
    box = row.get("box")
    if mask.cell_grid != geom.cell_grid:
        rows, cols = mask.cell_grid
        mask_geom = geometry_from_grid((1, 2 * rows, 2 * cols), orig_size=size)
        box, geom = (map_box(box, geom, mask_geom) if box is not None else None), mask_geom
    if image.size != size:
        image = image.resize(size)
    return draw_overlay(image, mask.cells, geom, box)
