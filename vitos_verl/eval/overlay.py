"""Kept-token overlays: which 28x28 cells the reasoning stream sees, drawn over the image.

One row of a prepared parquet, with its ground-truth box (or ``--box``, in original pixels, or
as a model writes it with ``--box-format abs|norm1|norm1000``: pixels, ``[0, 1]`` or 0-1000 of
the resized image)::

    python -m vitos_verl.eval.overlay --data outputs/data/slake/test.parquet \
        --record 11965 --out outputs/overlay.png
    python -m vitos_verl.eval.overlay --data outputs/data/slake/test.parquet \
        --record 11965 --box 0.42 0.31 0.66 0.58 --box-format norm1 --out outputs/overlay.png

A grid of the model's own boxes and kept cells from a rollout JSONL that the trainer wrote
(``trainer.rollout_data_dir`` / ``validation_data_dir``; :mod:`vitos_verl.trainer.rollout_dump`)::

    python -m vitos_verl.eval.overlay --rollouts outputs/runs/smoke_cpu/rollouts/3_reasoning.jsonl \
        --n 16 --out grid.png

Every line's ``box`` is in resized pixels whatever format the model wrote (``box_format``;
``box_raw`` holds its own coordinates), so the grid is drawn the same way for every format.
The JSONL carries no image bytes: each line names its row (``data_source``, ``split``,
``record_id``) and the images are read from the prepared parquet files, the ones listed in the
``data_files.json`` the trainer writes beside the JSONL, or those given with ``--data``. The first
``--n`` distinct boxes of the file are drawn (answers that share a box share its tile), each
captioned with its record id, stream, accuracy, IoU and keep ratio; a row whose image is not found
gets a grey tile.

The pictures themselves are :mod:`vitos_verl.pruning.draw`'s (:func:`~vitos_verl.pruning.draw.draw_overlay`,
:func:`~vitos_verl.pruning.draw.draw_rollout`): unkept cells dimmed, kept cells outlined, the box in
red, in original pixels.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from vitos_verl.data.parquet_rows import open_image, read_rows
from vitos_verl.pruning import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, KeepMask, box_to_resized, image_geometry
from vitos_verl.pruning.boxes import BOX_FORMATS, from_box_format
from vitos_verl.pruning.draw import draw_overlay, draw_rollout
from vitos_verl.records import DATA_FILES

#: Height in pixels of a grid tile's caption strip.
CAPTION_PX = 14


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return str(row.get("data_source")), str(row.get("split")), str(row.get("record_id"))


def load_row_images(rows: Iterable[Mapping[str, Any]], data_files: Sequence[str | Path]) -> dict[tuple[str, str, str], Image.Image]:
    """The images of rollout lines, read from the prepared parquet files they came from.

    Rows are matched on ``(data_source, extra_info.split, extra_info.record_id)``; only the
    parquet row groups holding a wanted row are read (:func:`vitos_verl.data.parquet_rows.read_rows`),
    and the first image of each is opened with :func:`vitos_verl.data.parquet_rows.open_image`.

    Returns:
        ``{(data_source, split, record_id): image}`` for the rows found (missing ones are absent).

    Raises:
        OSError, pyarrow.ArrowInvalid: a file that is missing or not parquet.
    """
    import pyarrow.parquet as pq

    wanted = {_row_key(r) for r in rows}
    found: dict[tuple[str, str, str], Image.Image] = {}
    for path in data_files:
        if len(found) == len(wanted):
            break
        meta = pq.read_table(path, columns=["data_source", "extra_info"]).to_pylist()
        hits = {}
        for i, m in enumerate(meta):
            info = m["extra_info"] or {}
            key = (str(m["data_source"]), str(info.get("split")), str(info.get("record_id")))
            if key in wanted and key not in found:
                hits[i] = key
        if not hits:
            continue
        for i, row in read_rows(path, hits, columns=["images"]).items():
            image = open_image(row["images"][0]) if row.get("images") else None
            if image is not None:
                found[hits[i]] = image
    return found


def _caption(row: Mapping[str, Any]) -> str:
    def num(k: str) -> str:
        v = row.get(k)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

    return f"{row.get('record_id')} {str(row.get('stream', '?'))[:1]} acc {num('acc')} iou {num('iou')} keep {num('keep_ratio')}"


def rollout_grid(rows: Sequence[Mapping[str, Any]], images: Mapping[tuple[str, str, str], Image.Image], tile: int = 256) -> Image.Image:
    """A grid of :func:`draw_rollout` tiles, ``ceil(sqrt(n))`` columns, each ``tile`` pixels
    square (the overlay fitted inside, aspect kept) above a :data:`CAPTION_PX` caption strip.

    Returns:
        RGB image of ``(cols * tile, rows * (tile + CAPTION_PX))`` pixels.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("no rollout rows to draw")
    cols = math.ceil(math.sqrt(len(rows)))
    nrows = math.ceil(len(rows) / cols)
    out = Image.new("RGB", (cols * tile, nrows * (tile + CAPTION_PX)), (0, 0, 0))
    draw = ImageDraw.Draw(out)
    for k, row in enumerate(rows):
        x, y = (k % cols) * tile, (k // cols) * (tile + CAPTION_PX)
        image = images.get(_row_key(row))
        if image is None:
            pic = Image.new("RGB", (tile, tile), (96, 96, 96))
        else:
            pic = ImageOps.contain(draw_rollout(image, row), (tile, tile))
        out.paste(pic, (x + (tile - pic.size[0]) // 2, y + (tile - pic.size[1]) // 2))
        draw.text((x + 2, y + tile + 1), _caption(row)[: tile // 6], fill=(255, 255, 255))
    return out


def read_rollouts(path: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` lines of a rollout JSONL with distinct boxes (``uid``, ``box_index``)."""
    out, seen = [], set()
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            key = (row.get("uid"), row.get("box_index"))
            if key in seen:
                continue
            seen.add(key)
            out.append(row)
            if len(out) == n:
                break
    return out


def _rollouts_main(a: argparse.Namespace) -> Path:
    rows = read_rollouts(a.rollouts, a.n)
    if not rows:
        raise SystemExit(f"{a.rollouts}: no rollout lines")
    data = a.data
    if not data:
        sidecar = Path(a.rollouts).parent / DATA_FILES
        if not sidecar.exists():
            raise SystemExit(f"no --data given and no {sidecar}: name the parquet files the rows come from")
        listed = json.loads(sidecar.read_text())
        data = [p for key in ("train_files", "val_files") for p in listed.get(key, [])]
    images = load_row_images(rows, data)
    missing = [r.get("record_id") for r in rows if _row_key(r) not in images]
    if missing:
        print(f"warning: no image found for records {missing} in {[str(d) for d in data]}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    grid = rollout_grid(rows, images, a.tile)
    grid.save(a.out)
    print(f"{a.out}: {len(rows)} samples of {a.rollouts}, {grid.size[0]}x{grid.size[1]} pixels")
    return a.out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.overlay", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, nargs="+", help="prepared parquet (a row's image and ground-truth boxes); with "
                   "--rollouts, the files its rows come from (default: the data_files.json beside it)")
    p.add_argument("--rollouts", type=Path, help="a rollout JSONL of the trainer (trainer.rollout_data_dir / validation_data_dir)")
    p.add_argument("--n", type=int, default=16, help="with --rollouts: samples in the grid")
    p.add_argument("--tile", type=int, default=256, help="with --rollouts: tile size in pixels")
    p.add_argument("--record", default="", help="extra_info.record_id of the row (default: first row with a box)")
    p.add_argument("--image", type=Path, help="an image file instead of --data")
    p.add_argument("--box", type=float, nargs=4, help="box in ORIGINAL pixels (default: the row's gt boxes' union)")
    p.add_argument("--box-format", choices=("original", *BOX_FORMATS), default="original",
                   help="the coordinates of --box: original pixels, or as a model writes them (abs: resized pixels; norm1, "
                        "norm1000: [0, 1], 0-1000 of the resized image)")
    p.add_argument("--margin-cells", type=int, default=1)
    p.add_argument("--min-keep-ratio", type=float, default=0.0)
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.rollouts:
        return _rollouts_main(a)
    box = a.box
    if a.image:
        image = Image.open(a.image)
    elif a.data:
        import pyarrow.parquet as pq

        rows = pq.read_table(a.data[0]).to_pylist()
        row = next(
            (r for r in rows if (r["extra_info"]["record_id"] == a.record if a.record else r["extra_info"]["gt_boxes"])),
            None,
        )
        if row is None:
            raise SystemExit(f"no row {a.record or 'with a box'} in {a.data[0]}")
        image = open_image(row["images"][0] if row.get("images") else None)
        if image is None:
            raise SystemExit(f"row {row['extra_info']['record_id']} of {a.data[0]} holds no image")
        if box is None and row["extra_info"]["gt_boxes"]:
            gt = row["extra_info"]["gt_boxes"]
            box = [min(b[0] for b in gt), min(b[1] for b in gt), max(b[2] for b in gt), max(b[3] for b in gt)]
    else:
        raise SystemExit("give --data, --image or --rollouts")
    geom = image_geometry(*image.size, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    if box is not None and a.box is not None and a.box_format != "original":
        box_r = from_box_format(box, a.box_format, geom.resized_size)
    else:
        box_r = box_to_resized(box, geom) if box is not None else None
    mask = KeepMask.from_box(box_r, geom.cell_grid, a.margin_cells, a.min_keep_ratio)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, mask, geom, box_r).save(a.out)
    print(f"{a.out}: kept {mask.num_kept}/{mask.num_cells} visual tokens (keep ratio {mask.ratio:.3f})")
    return a.out


if __name__ == "__main__":
    main()
