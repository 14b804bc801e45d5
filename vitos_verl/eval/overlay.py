"""Kept-token overlays: which 28x28 cells the reasoning stream sees, drawn over the image.

    python -m vitos_verl.eval.overlay --data outputs/data/slake/test.parquet \
        --record 11965 --out outputs/overlay.png

Unkept cells are dimmed, kept cells outlined, the box drawn in red; the picture is in
original pixels (cells mapped back from the resized frame with the processor's scale).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vitos_verl.pruning import (
    CELL,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageGeometry,
    box_to_keep_mask,
    box_to_original,
    box_to_resized,
    image_geometry,
    keep_ratio,
)


def draw_overlay(
    image: Image.Image, mask: torch.Tensor, geom: ImageGeometry, box_resized: Sequence[float] | None = None, dim: float = 0.35
) -> Image.Image:
    """RGB copy of ``image`` (original size) with the keep mask drawn on it.

    Args:
        image: the original image.
        mask: bool ``(rows, cols)`` keep mask over ``geom.cell_grid``.
        geom: the image's geometry (:func:`vitos_verl.pruning.image_geometry`).
        box_resized: optional ``[x1, y1, x2, y2]`` in resized pixels, drawn in red.
        dim: brightness of unkept cells, in ``[0, 1]``.

    Raises:
        ValueError: mask shape differs from the geometry's cell grid, or the image size from
            ``geom.orig_size``.
    """
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


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.overlay", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="prepared parquet (a row's image and ground-truth boxes)")
    p.add_argument("--record", default="", help="extra_info.record_id of the row (default: first row with a box)")
    p.add_argument("--image", type=Path, help="an image file instead of --data")
    p.add_argument("--box", type=float, nargs=4, help="box in ORIGINAL pixels (default: the row's gt boxes' union)")
    p.add_argument("--margin-cells", type=int, default=1)
    p.add_argument("--min-keep-ratio", type=float, default=0.0)
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    box = a.box
    if a.image:
        image = Image.open(a.image)
    elif a.data:
        import pyarrow.parquet as pq

        rows = pq.read_table(a.data).to_pylist()
        row = next(
            (r for r in rows if (r["extra_info"]["record_id"] == a.record if a.record else r["extra_info"]["gt_boxes"])),
            None,
        )
        if row is None:
            raise SystemExit(f"no row {a.record or 'with a box'} in {a.data}")
        image = Image.open(io.BytesIO(row["images"][0]["bytes"]))
        if box is None and row["extra_info"]["gt_boxes"]:
            gt = row["extra_info"]["gt_boxes"]
            box = [min(b[0] for b in gt), min(b[1] for b in gt), max(b[2] for b in gt), max(b[3] for b in gt)]
    else:
        raise SystemExit("give --data or --image")
    geom = image_geometry(*image.size, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    box_r = box_to_resized(box, geom) if box is not None else None
    mask = box_to_keep_mask(box_r, geom.cell_grid, a.margin_cells, a.min_keep_ratio)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, mask, geom, box_r).save(a.out)
    print(f"{a.out}: kept {int(mask.sum())}/{mask.numel()} visual tokens (keep ratio {keep_ratio(mask):.3f})")
    return a.out


if __name__ == "__main__":
    main()
