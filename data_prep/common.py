"""Shared plumbing of the converters: image checks, skip accounting, parquet writing, CLI.

Every input row ends in exactly one place: written, or counted under a skip reason (bad
input) or a filter (a row the options leave out, e.g. another language). The summary
printed and written as JSON lists both, so nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vitos_verl.data import make_row

# Explicit schema: stable types whatever the rows hold (e.g. no row with boxes or options).
_BOXES = pa.list_(pa.list_(pa.float64()))
_MSGS = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", _MSGS),
        ("reasoning_prompt", _MSGS),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("record_id", pa.string()),
                    ("question", pa.string()),
                    ("answer", pa.string()),
                    ("answer_type", pa.string()),
                    ("question_type", pa.string()),
                    ("gt_boxes", _BOXES),
                    ("box_labels", pa.list_(pa.string())),
                    ("box_rule", pa.string()),
                    ("image_size", pa.list_(pa.int64())),
                    ("modality", pa.string()),
                    ("organ", pa.string()),
                    ("lang", pa.string()),
                    ("options", pa.list_(pa.struct([("letter", pa.string()), ("content", pa.string())]))),
                ]
            ),
        ),
    ]
)

# Canonical split names; HF layouts name them differently.
SPLIT_ALIASES = {"train": "train", "validation": "val", "validate": "val", "valid": "val", "val": "val", "test": "test"}


class SkipRow(Exception):
    """A record that cannot become a row; ``reason`` is the summary's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SplitReport:
    """Accounting of one split: ``rows_in == rows_out + sum(skipped) + sum(filtered)``."""

    rows_in: int = 0
    rows_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Count a record that raises :class:`SkipRow` (its reason) or ``ValueError``
        (``malformed_record``, e.g. ``make_row``'s checks) instead of crashing the run."""
        try:
            yield
        except SkipRow as e:
            self.skip(e.reason, str(e))
        except ValueError as e:
            self.skip("malformed_record", str(e))

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "notes": dict(sorted(self.notes.items())),
            "skip_examples": dict(sorted(self.examples.items())),
        }


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    size: tuple[int, int]  # original (W, H)


class ImageCache:
    """Reads and checks each image once (many questions share one image)."""

    def __init__(self) -> None:
        self._cache: dict[str, CheckedImage | SkipRow] = {}

    def load(self, path: str | os.PathLike) -> CheckedImage:
        """Bytes and size of an image file.

        Raises:
            SkipRow: ``missing_image`` or ``corrupt_image``.
        """
        key = str(path)
        if key not in self._cache:
            try:
                data = Path(path).read_bytes()
                self._cache[key] = check_image_bytes(data)
            except FileNotFoundError:
                self._cache[key] = SkipRow("missing_image", key)
            except SkipRow as e:
                self._cache[key] = SkipRow(e.reason, key)
        hit = self._cache[key]
        if isinstance(hit, SkipRow):
            raise hit
        return hit


def check_image_bytes(data: bytes | None) -> CheckedImage:
    """Decode an encoded image fully (not just its header) and return its size.

    Raises:
        SkipRow: ``corrupt_image`` when Pillow cannot decode it or it has no pixels.
    """
    if not data:
        raise SkipRow("corrupt_image", "empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SkipRow("corrupt_image", str(e)[:200]) from e
    if size[0] <= 0 or size[1] <= 0:
        raise SkipRow("corrupt_image", f"size {size}")
    return CheckedImage(data, (int(size[0]), int(size[1])))


def clip_boxes(boxes: Iterable[list[float]], size: tuple[int, int], report: SplitReport) -> list[list[float]]:
    """Clip ``[x1, y1, x2, y2]`` original-pixel boxes to the image; drop empty ones (counted)."""
    W, H = size
    out = []
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b)
        c = [min(max(x1, 0.0), W), min(max(y1, 0.0), H), min(max(x2, 0.0), W), min(max(y2, 0.0), H)]
        if c != [x1, y1, x2, y2]:
            report.notes["boxes_clipped"] += 1
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            report.notes["boxes_dropped_empty"] += 1
            continue
        out.append(c)
    return out


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows with :data:`SCHEMA` atomically (tmp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


# --- Hugging Face parquet layout (image bytes + question + answer) -------------------------


def hf_parquet_files(src: Path) -> dict[str, list[Path]]:
    """Parquet files under ``src`` grouped by canonical split (from the file name)."""
    out: dict[str, list[Path]] = {}
    for f in sorted(glob.glob(str(src / "**" / "*.parquet"), recursive=True)):
        name = Path(f).name.lower()
        m = re.match(r"(train|validation|validate|valid|val|test)\b", name) or re.search(
            r"(?:^|[-_/])(train|validation|validate|valid|val|test)(?:[-_.]|$)", name
        )
        if m:
            out.setdefault(SPLIT_ALIASES[m.group(1)], []).append(Path(f))
    return out


def hf_records(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Rows of HF-layout parquet files as dicts, one at a time (a row group in memory)."""
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=256):
            yield from batch.to_pylist()


def hf_image_bytes(value: Any) -> tuple[bytes | None, str]:
    """``(bytes, path)`` from an HF ``Image`` feature value (dict or raw bytes)."""
    if isinstance(value, dict):
        return value.get("bytes"), str(value.get("path") or "")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    return None, ""


def infer_answer_type(answer: str) -> str:
    """``CLOSED`` for yes/no answers, else ``OPEN`` (HF layouts carry no answer type)."""
    return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"


def convert_hf(dataset: str, files: list[Path], split: str, report: SplitReport) -> list[dict[str, Any]]:
    """Rows of one split from the HF parquet layout (``image``, ``question``, ``answer``)."""
    rows = []
    for i, rec in enumerate(tqdm(hf_records(files), desc=f"{dataset}/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            q, a = rec.get("question"), rec.get("answer")
            if not isinstance(q, str) or not q.strip() or a is None or not str(a).strip():
                raise SkipRow("empty_question_or_answer", f"row {i}")
            data, path = hf_image_bytes(rec.get("image"))
            img = check_image_bytes(data)
            rows.append(
                make_row(
                    data_source=dataset,
                    split=split,
                    index=i,
                    question=q,
                    answer=str(a),
                    image_bytes=img.data,
                    image_path=path or f"{split}/{i}",
                    image_size=img.size,
                    answer_type=str(rec.get("answer_type") or infer_answer_type(str(a))),
                    question_type=str(rec.get("question_type") or rec.get("content_type") or ""),
                    modality=str(rec.get("modality") or ""),
                    organ=str(rec.get("location") or rec.get("image_organ") or ""),
                    record_id=str(rec.get("qid") or rec.get("id") or i),
                )
            )
    return rows


# --- CLI -----------------------------------------------------------------------------------


def parser(dataset: str, default_src: str, splits: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m data_prep.{dataset}",
        description=f"Convert {dataset} (release layout or Hugging Face parquet layout) to verl parquet.",
    )
    p.add_argument("--src", type=Path, default=Path(default_src), help="dataset folder (release or HF layout)")
    p.add_argument("--out", type=Path, default=Path("outputs/data") / dataset, help="output folder")
    p.add_argument("--splits", default=",".join(splits), help=f"comma-separated, from {','.join(splits)}")
    p.add_argument("--lang", default="en", help="question language to keep: en, zh or all (SLAKE only)")
    p.add_argument("--limit", type=int, default=0, help="keep at most N rows per split (0: all)")
    return p


def run(
    dataset: str,
    args: argparse.Namespace,
    release: Callable[[Path, str, argparse.Namespace, SplitReport], list[dict[str, Any]]],
) -> dict[str, Any]:
    """Convert every requested split, write ``<out>/<split>.parquet`` and ``summary.json``.

    ``release(src, split, args, report)`` converts the dataset's release layout; the HF
    parquet layout is detected (any ``*.parquet`` under ``--src``) and handled here.

    Raises:
        FileNotFoundError: ``--src`` does not exist.
        ValueError: an unknown split, or a split absent from an HF-layout folder.
    """
    src: Path = args.src
    if not src.exists():
        raise FileNotFoundError(f"{dataset}: source folder {src} does not exist")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    hf = hf_parquet_files(src)
    summary: dict[str, Any] = {"dataset": dataset, "src": str(src), "layout": "hf_parquet" if hf else "release", "splits": {}}
    for split in splits:
        report = SplitReport()
        if hf:
            if split not in hf:
                raise ValueError(f"{dataset}: no parquet for split {split!r} under {src} (found {sorted(hf)})")
            rows = convert_hf(dataset, hf[split], split, report)
        else:
            rows = release(src, split, args, report)
        if args.limit and len(rows) > args.limit:
            report.filtered["limit"] += len(rows) - args.limit
            rows = rows[: args.limit]
        report.rows_out = len(rows)
        accounted = report.rows_out + sum(report.skipped.values()) + sum(report.filtered.values())
        assert accounted == report.rows_in, f"row accounting broken: {accounted} != {report.rows_in}"
        out = args.out / f"{split}.parquet"
        write_parquet(rows, out)
        summary["splits"][split] = {"file": str(out), **report.as_dict()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"== {summary['dataset']} ({summary['layout']} layout, {summary['src']})")
    for split, s in summary["splits"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
        filtered = ", ".join(f"{k}={v}" for k, v in s["filtered"].items()) or "none"
        print(f"  {split:5s} rows_in={s['rows_in']:6d} rows_out={s['rows_out']:6d} skipped: {skipped}; filtered: {filtered}")
        if s["notes"]:
            print("        notes: " + ", ".join(f"{k}={v}" for k, v in s["notes"].items()))
