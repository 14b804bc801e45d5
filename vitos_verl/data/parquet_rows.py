"""Rows and their images read back from a prepared parquet (:func:`vitos_verl.data.schema.make_row`).

The tools that draw a question's picture after the fact find its row here: the evaluation cards
(:mod:`vitos_verl.eval.report_cards`, by the row's position), the rollout overlays
(:mod:`vitos_verl.eval.overlay`, by ``(data_source, split, record_id)``), and the trainer's
validation table (:mod:`vitos_verl.trainer.rollout_dump`, from a chat's image part, which holds the
same image cell). How a caller finds *which* row it wants is its own; reading the rows and opening
the image is done once, here.

PIL and pyarrow are imported when a function runs, so importing this module costs nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_rows(path: str | Path, positions: Iterable[int], columns: Sequence[str] | None = None) -> dict[int, dict]:
    """The rows at the given positions of a parquet file, reading only the row groups that hold them.

    Args:
        path: a parquet file.
        positions: 0-based row positions in the file; those outside it are left out (repeats are
            read once).
        columns: the columns to read; those the file lacks are left out of the rows (None: all).

    Returns:
        ``{position: {column: value}}`` for the positions found.

    Raises:
        OSError, pyarrow.ArrowInvalid: a file that is missing or not parquet.
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in columns if c in names] if columns is not None else None
    starts, total = [], 0
    for g in range(pf.num_row_groups):
        starts.append(total)
        total += pf.metadata.row_group(g).num_rows
    wanted: dict[int, list[int]] = {}
    for i in sorted(set(positions)):
        if 0 <= i < total:
            g = max(k for k, s in enumerate(starts) if s <= i)
            wanted.setdefault(g, []).append(i)
    out = {}
    for g, idx in wanted.items():
        table = pf.read_row_group(g, columns=columns)
        for i in idx:
            out[i] = table.slice(i - starts[g], 1).to_pylist()[0]
    return out


def open_image(cell: Mapping[str, Any] | None) -> Any:
    """The PIL image of an image cell: a row's ``images[k]`` (``{"bytes", "path"}``) or a chat's
    image part (``{"type": "image", "bytes", "path", "image"}``, as verl's dataset builds it).

    Tries, in order: the cell's ``image`` if it is already a PIL image, its ``bytes``, its ``path``
    if that file exists. The image is opened lazily (``Image.open``): corrupt bytes raise when it
    is loaded or drawn, not here.

    Returns:
        ``PIL.Image.Image``, or None when the cell is empty or has none of the three.

    Raises:
        PIL.UnidentifiedImageError: bytes or a file that are not an image.
    """
    if not cell:
        return None
    from PIL import Image

    if isinstance(cell.get("image"), Image.Image):
        return cell["image"]
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    if cell.get("path") and Path(cell["path"]).is_file():
        return Image.open(cell["path"])
    return None
