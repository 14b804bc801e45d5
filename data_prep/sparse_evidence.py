"""A controlled sparse-evidence VQA task: the answer is visible only inside one known box.

Each image is a ``size`` x ``size`` px dark canvas cut into ``grid`` x ``grid`` regions (default
2 x 2 quadrants of 112 px = 4 x 4 LLM visual tokens of 28 px each; ``size`` must be a multiple
of ``28 * grid``). One region holds the *target*, a filled disc; every other region holds a
distractor, a filled square, each of another colour than the target (while colours last). The
question asks for the target's colour (``answer_type`` ``CLOSED``: one word out of ``colours``).

* Full image: every colour is on it, so the policy must first find the disc.
* Evidence (``gt_boxes``): the target's region, ``[x1, y1, x2, y2]`` in original pixels.
  Objects sit at least one 28-px cell inside their region, so a keep mask of the region
  dilated by ``margin_cells=1`` (the trainer's default) shows the disc and no distractor:
  pruned to the evidence, the image shows only the answer.
* Balanced: regions and colours of the targets cycle over every (region, colour) pair before
  the order is shuffled, so each answer and each region is equally frequent (up to one cycle).
* A box on a coarse grid: a small policy learns ``grid**2`` box strings; a box over the whole
  image scores IoU ``1 / grid**2`` against every row (a "safe" box is exactly chance).

Rows follow the schema of the real converters (:func:`vitos_verl.data.make_row`, PNG bytes
embedded, ``data_source`` ``sparse_evidence``), so the SFT builder, the trainer, the evaluation
harness and the overlays take them unchanged. Seeded: the same arguments write the same bytes;
train and validation draw from separate streams of the seed, and a validation image equal to a
training image is counted (``summary.json`` ``val_images_in_train``, expected 0).

    python -m data_prep.sparse_evidence --out outputs/data/sparse_evidence --seed 0 --n-train 2000 --n-val 128
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_prep.common import ParquetOutputs
from vitos_verl.data import make_row
from vitos_verl.pruning import CELL

DATASET = "sparse_evidence"
QUESTION = "What colour is the disc?"
# RGB of each answer; the first ``n_colours`` are used
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
}
BACKGROUND = (20, 20, 20)
OUTLINE = (128, 128, 128)  # mid-grey: no answer's colour, and the position cue does not saturate it


@dataclass(frozen=True)
class TaskSpec:
    """The task's geometry (pixels of the original image, which the recipes do not resize).

    Attributes:
        size: image side in px; a multiple of ``CELL * grid`` (28 px per visual token).
        grid: regions per side (``grid**2`` possible evidence boxes).
        n_colours: answers (the first ``n_colours`` of :data:`PALETTE`); at least 2.
        object_cells: the disc's diameter in 28-px cells (may be fractional).
        distractor_cells: the squares' side in cells (None: ``object_cells``). Squares smaller
            than the disc make the disc the most salient object without telling its colour.
        noise: std of Gaussian pixel noise added to the canvas (0: none).
        outline: width in px of a grey outline around the disc (0: none). It makes the disc
            easy to find (grey pixels are rare) without telling its colour: the full image still
            shows every colour, the answer is still only inside the evidence.
        position_cue: a bias field that tells where a pixel is: after drawing, every pixel's red
            channel rises by up to ``position_cue`` (intensity levels) from the left edge to the
            right one and its blue channel likewise from top to bottom (0: none), as the bias
            field of an MRI scanner shades a scan. Bright channels saturate (a red disc's red
            channel is 255 wherever the field passes 35), so red and yellow discs keep their
            column only where the field is low; scaling the drawing into ``[0, 255 - cue]``
            first removes that, but then 250 warm-start steps learned no position at all
            (docs/learning.md section 3), so the drawing is left as it is. Qwen2.5-VL has no absolute position embedding
            (2-D RoPE in the ViT, M-RoPE in the LLM: relative positions only), and a visual token
            that the disc fills shows nothing of where it lies; with the field, the disc's own
            pixels carry their position. Measured with the ``learn`` policy under supervision
            (docs/learning.md): a lone disc's quadrant is learned in 125 steps with a field of
            120 and not in 150 without one.
    """

    size: int = 224
    grid: int = 2
    n_colours: int = 4
    object_cells: float = 1.5
    distractor_cells: float | None = None
    noise: float = 8.0
    outline: int = 0
    position_cue: float = 0.0

    def check(self) -> None:
        """Raises ValueError for a geometry the task cannot be drawn in."""
        if self.grid < 1 or self.size <= 0 or self.size % (CELL * self.grid):
            raise ValueError(f"size={self.size} must be a positive multiple of {CELL} * grid={self.grid}")
        if not 2 <= self.n_colours <= len(PALETTE):
            raise ValueError(f"n_colours={self.n_colours} must be in [2, {len(PALETTE)}]")
        region = self.size // self.grid
        inner = region - 2 * CELL  # one cell of margin on each side (see module doc)
        for name, cells in (("object_cells", self.object_cells), ("distractor_cells", self.square_cells)):
            if not 0 < cells * CELL <= inner:
                raise ValueError(
                    f"{name}={cells} ({cells * CELL:.0f} px) must fit the "
                    f"{inner} px inside a {region} px region less one cell each side"
                )
        if self.noise < 0:
            raise ValueError(f"noise={self.noise} must be >= 0")
        if not 0 <= self.position_cue <= 255 - max(BACKGROUND):
            raise ValueError(f"position_cue={self.position_cue} must be in [0, {255 - max(BACKGROUND)}]")
        if not 0 <= self.outline < self.object_cells * CELL / 2:
            raise ValueError(f"outline={self.outline} must be >= 0 and less than the object's radius")

    @property
    def square_cells(self) -> float:
        return self.object_cells if self.distractor_cells is None else self.distractor_cells

    @property
    def colours(self) -> list[str]:
        return list(PALETTE)[: self.n_colours]

    def region_box(self, region: int) -> list[float]:
        """``[x1, y1, x2, y2]`` of region ``region`` (row-major), original pixels."""
        side = self.size // self.grid
        r, c = divmod(region, self.grid)
        return [float(c * side), float(r * side), float((c + 1) * side), float((r + 1) * side)]


def draw(spec: TaskSpec, target_region: int, colours: Sequence[str], rng: np.random.Generator) -> Image.Image:
    """The RGB image: ``colours[k]`` drawn in region ``k``, a disc in ``target_region``, squares elsewhere.

    Args:
        colours: one colour name per region (row-major; ``None`` leaves a region empty).
        rng: jitter of each object inside its region and the pixel noise.
    """
    side = spec.size // spec.grid
    disc, square = (int(round(c * CELL)) for c in (spec.object_cells, spec.square_cells))
    canvas = Image.new("RGB", (spec.size, spec.size), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for k, name in enumerate(colours):
        if name is None:
            continue
        x0, y0 = spec.region_box(k)[:2]
        obj = disc if k == target_region else square
        span = side - 2 * CELL - obj  # free play inside the margins
        x = int(x0) + CELL + int(rng.integers(0, span + 1))
        y = int(y0) + CELL + int(rng.integers(0, span + 1))
        if k == target_region:
            outline = OUTLINE if spec.outline else None
            pen.ellipse([x, y, x + obj - 1, y + obj - 1], fill=PALETTE[name], outline=outline, width=spec.outline)
        else:
            pen.rectangle([x, y, x + obj - 1, y + obj - 1], fill=PALETTE[name])
    px = np.asarray(canvas, dtype=np.float32)
    if spec.position_cue:  # a bias field over every pixel, objects included
        ramp = np.linspace(0.0, spec.position_cue, spec.size, dtype=np.float32)
        px = px + np.stack([np.broadcast_to(ramp[None, :], px.shape[:2]), np.zeros(px.shape[:2], np.float32),
                            np.broadcast_to(ramp[:, None], px.shape[:2])], axis=-1)  # fmt: skip
    if spec.noise > 0:
        px = px + rng.normal(0.0, spec.noise, (spec.size, spec.size, 3))
    if spec.position_cue or spec.noise > 0:
        canvas = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
    return canvas


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_split(
    spec: TaskSpec, split: str, n: int, rng: np.random.Generator, fixed: tuple[int, str] | None = None
) -> list[dict[str, Any]]:
    """``n`` rows of one split (see module doc), balanced over (region, colour) pairs, or every
    target in one ``fixed`` ``(region, colour)``: a task a policy learns without the image (the
    wiring check of tests/test_learning.py)."""
    regions, colours = spec.grid**2, spec.colours
    pairs = [(r, c) for r in range(regions) for c in range(len(colours))]
    if fixed is not None:
        if not (0 <= fixed[0] < regions and fixed[1] in colours):
            raise ValueError(f"fixed target {fixed}: region must be in [0, {regions}) and colour one of {colours}")
        pairs = [(fixed[0], colours.index(fixed[1]))]
    order = [pairs[i % len(pairs)] for i in range(n)]
    rng.shuffle(order)
    rows = []
    for i, (region, c) in enumerate(order):
        others = [x for x in colours if x != colours[c]]
        rng.shuffle(others)
        per_region: list[str | None] = []
        for k in range(regions):
            if k == region:
                per_region.append(colours[c])
            else:  # distractors take the other colours in turn (repeating when regions outnumber them)
                per_region.append(others[(k - (k > region)) % len(others)])
        img = draw(spec, region, per_region, rng)
        rows.append(
            make_row(
                data_source=DATASET,
                split=split,
                index=i,
                question=QUESTION,
                answer=colours[c],
                image_bytes=_png(img),
                image_path=f"{split}/{i:06d}.png",
                image_size=(spec.size, spec.size),
                answer_type="CLOSED",
                question_type="colour",
                gt_boxes=[spec.region_box(region)],
                box_labels=["disc"],
                box_rule="named",
                modality="synthetic",
                record_id=f"{split}-{i}",
            )
        )
    return rows


def _digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(row["images"][0]["bytes"]).hexdigest()


def generate(
    out: Path, seed: int, n_train: int, n_val: int, spec: TaskSpec = TaskSpec(), fixed: tuple[int, str] | None = None
) -> dict[str, Any]:
    """Write ``<out>/train.parquet``, ``<out>/val.parquet`` and ``<out>/summary.json``.

    Returns:
        The summary: the spec, the seed, per split the row count, answer and region counts,
        and ``val_images_in_train`` (validation images byte-identical to a training image).

    Args:
        fixed: ``(region, colour)`` of every target (:func:`make_split`), or None (balanced).

    Raises:
        ValueError: a bad spec or fixed target, or ``n_train`` / ``n_val`` < 1.
    """
    spec.check()
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train={n_train} and n_val={n_val} must be >= 1")
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    tables = {"train": make_split(spec, "train", n_train, train_rng, fixed), "val": make_split(spec, "val", n_val, val_rng, fixed)}
    train_digests = {_digest(r) for r in tables["train"]}
    summary: dict[str, Any] = {"dataset": DATASET, "seed": seed, "spec": asdict(spec), "question": QUESTION,
                               "fixed_target": list(fixed) if fixed else None, "splits": {}}  # fmt: skip
    for split, rows in tables.items():
        summary["splits"][split] = {
            "file": str(out / f"{split}.parquet"),
            "rows_out": len(rows),
            "answers": dict(sorted(Counter(r["reward_model"]["ground_truth"] for r in rows).items())),
            "regions": dict(sorted(Counter(str(r["extra_info"]["gt_boxes"][0]) for r in rows).items())),
        }
    summary["val_images_in_train"] = sum(_digest(r) in train_digests for r in tables["val"])
    with ParquetOutputs(out) as outputs:
        for split, rows in tables.items():
            summary["splits"][split].update(outputs.write(split, rows))
        outputs.publish(summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog=f"python -m data_prep.{DATASET}", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (train.parquet, val.parquet, summary.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=128)
    d = TaskSpec()
    p.add_argument("--size", type=int, default=d.size, help="image side in px (a multiple of 28 * grid)")
    p.add_argument("--grid", type=int, default=d.grid, help="regions per side")
    p.add_argument("--colours", type=int, default=d.n_colours, help=f"answers (at most {len(PALETTE)})")
    p.add_argument("--object-cells", type=float, default=d.object_cells, help="object side in 28-px cells")
    p.add_argument("--noise", type=float, default=d.noise, help="std of the pixel noise")
    p.add_argument("--distractor-cells", type=float, default=d.distractor_cells,
                   help="side of the squares in 28-px cells (default: --object-cells)")
    p.add_argument("--outline", type=int, default=d.outline, help="grey outline of the disc in px (0: none)")
    p.add_argument("--position-cue", type=float, default=d.position_cue,
                   help="background ramp in intensity levels that tells the position (0: flat)")
    a = p.parse_args(argv)
    spec = TaskSpec(size=a.size, grid=a.grid, n_colours=a.colours, object_cells=a.object_cells,
                    distractor_cells=a.distractor_cells, noise=a.noise,
                    outline=a.outline, position_cue=a.position_cue)  # fmt: skip
    summary = generate(a.out, a.seed, a.n_train, a.n_val, spec)
    print(json.dumps({k: summary[k] for k in ("dataset", "seed", "val_images_in_train")} | {
        s: v["rows_out"] for s, v in summary["splits"].items()}))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
