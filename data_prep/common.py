"""Shared plumbing of the converters: source checks, image checks, skip accounting, parquet writing, CLI.

Every input row ends in exactly one place: written, or counted under a skip reason (a bad
record, :data:`SKIP_REASONS`) or a filter (a row the options leave out, e.g. another
language); ``rows_in == rows_out + skipped + filtered`` is checked for every split. A problem
with a whole source file (missing, truncated or non-UTF-8 JSON / JSON lines / CSV, wrong
top-level type, a CSV or HF parquet without the needed columns) raises
:class:`SourceFileError` naming the file before anything is written. The parquet files and ``summary.json`` are published together (temp
files, then renames), so a summary never describes parquet it was not written with.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import string
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from vitos_verl.atomic import atomic_write_text
from vitos_verl.data import make_row
from vitos_verl.pruning.geometry import smart_resize

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
                    ("choices", pa.list_(pa.string())),
                ]
            ),
        ),
    ]
)

# Canonical split names; HF layouts name them differently.
SPLIT_ALIASES = {"train": "train", "validation": "val", "validate": "val", "valid": "val", "val": "val", "test": "test"}

# Every reason a record can be skipped for (the summary's ``skipped`` keys).
SKIP_REASONS: dict[str, str] = {
    "malformed_record": "not a JSON object, a required key missing, or a field of the wrong type",
    "bad_image_name": "image name null, not a string, empty, absolute or leaving the image folder",
    "non_string_question": "question is not a string",
    "non_string_answer": "answer is null, a boolean, a float, a list or an object (never stringified)",
    "empty_question_or_answer": "question or answer empty after stripping",
    "missing_image": "image file (or HF image bytes) absent",
    "image_not_a_file": "image path is a directory or another non-file",
    "unreadable_image": "image file exists but cannot be read",
    "corrupt_image": "Pillow cannot decode the image fully",
    "image_too_large": "more pixels than Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)",
    "bad_aspect_ratio": "aspect ratio Qwen2.5-VL's processor refuses (transformers' smart_resize: over 200)",
    "malformed_detection": "the image's SLAKE detection.json is unreadable or not a list of {label: [x, y, w, h]}",
    "bad_box": "a box the row needs is not 4 finite numbers with w, h > 0, or lies outside the image",
    "duplicate_qid": "record id already written in this split (the first one is kept)",
    "answer_not_an_option": "multiple-choice ground truth names none (or more than one) of the record's options",
}
MAX_DUPLICATES_LISTED = 50


class DataPrepError(ValueError):
    """A problem with the inputs or options given (the CLI prints it as one line, exit 2)."""


class SourceFileError(DataPrepError):
    """A whole source file (or split) cannot be used; the message names the file."""


class SkipRow(Exception):
    """A record that cannot become a row; ``reason`` is the summary's key (:data:`SKIP_REASONS`)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise KeyError(f"undocumented skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SplitReport:
    """Accounting of one split: ``rows_in == rows_out + sum(skipped) + sum(filtered)``."""

    rows_in: int = 0
    rows_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    _written_ids: dict[str, int] = field(default_factory=dict, repr=False)

    def skip(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise KeyError(f"undocumented skip reason {reason!r}")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail[:300])

    def note(self, key: str, detail: str = "", n: int = 1) -> None:
        """Count something worth knowing that does not drop the row (e.g. a clipped box)."""
        self.notes[key] += n
        if detail:
            self.examples.setdefault(key, detail[:300])

    def claim_id(self, record_id: str, where: str) -> None:
        """Mark ``record_id`` as written; a second row with the same id is a duplicate.

        Raises:
            SkipRow: ``duplicate_qid`` (the id is listed in the summary's ``duplicate_ids``).
        """
        if not record_id:
            return
        if record_id in self._written_ids:
            if len(self.duplicates) < MAX_DUPLICATES_LISTED:
                self.duplicates.append(record_id)
            raise SkipRow(
                "duplicate_qid", f"{record_id!r} at {where}, first written as row {self._written_ids[record_id]}"
            )
        self._written_ids[record_id] = len(self._written_ids)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Count a record that raises :class:`SkipRow` (its reason) or ``ValueError``
        (``malformed_record``, e.g. ``make_row``'s checks) instead of crashing the run."""
        try:
            yield
        except SkipRow as e:
            self.skip(e.reason, e.detail)
        except ValueError as e:
            self.skip("malformed_record", str(e))

    def check(self, where: str) -> None:
        """Raises ``AssertionError`` unless every row in is out, skipped or filtered."""
        accounted = self.rows_out + sum(self.skipped.values()) + sum(self.filtered.values())
        if accounted != self.rows_in:
            raise AssertionError(
                f"{where}: row accounting broken: rows_in={self.rows_in} but rows_out={self.rows_out} "
                f"+ skipped={sum(self.skipped.values())} + filtered={sum(self.filtered.values())} = {accounted}"
            )

    def as_dict(self) -> dict[str, Any]:
        """The split's part of ``summary.json`` (``rows_in``, ``rows_out``, ``skipped``, ...)."""
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "notes": dict(sorted(self.notes.items())),
            "skip_examples": dict(sorted(self.examples.items())),
            "duplicate_ids": list(self.duplicates),
        }


# --- record fields -------------------------------------------------------------------------


def question_answer(
    rec: dict[str, Any], report: SplitReport, q_key: str = "question", a_key: str = "answer"
) -> tuple[str, str]:
    """The question and answer text of a record, checked, never stringified from another type.

    A JSON integer answer (VQA-RAD has ten, e.g. ``4`` for "How many gallstones?") is exact as
    its decimal text and kept (counted in ``notes.answer_int_as_text``); null, booleans, floats,
    lists and objects are not answers.

    Raises:
        SkipRow: ``non_string_question``, ``non_string_answer`` or ``empty_question_or_answer``.
    """
    q, a = rec.get(q_key), rec.get(a_key)
    rid = rec.get("qid", rec.get("id", ""))
    if not isinstance(q, str):
        raise SkipRow("non_string_question", f"qid {rid}: question {q!r}"[:200])
    if isinstance(a, int) and not isinstance(a, bool):
        report.note("answer_int_as_text", f"qid {rid}: {a!r}")
        a = str(a)
    if not isinstance(a, str):
        raise SkipRow("non_string_answer", f"qid {rid}: answer {a!r}"[:200])
    if not q.strip() or not a.strip():
        raise SkipRow("empty_question_or_answer", f"qid {rid}")
    return q, a


def question_text(rec: dict[str, Any], key: str = "question") -> str:
    """The question text of a record, checked (never stringified from another type).

    Raises:
        SkipRow: ``non_string_question`` or ``empty_question_or_answer`` (blank).
    """
    q = rec.get(key)
    rid = rec.get("qid", rec.get("id", ""))
    if not isinstance(q, str):
        raise SkipRow("non_string_question", f"qid {rid}: question {q!r}"[:200])
    if not q.strip():
        raise SkipRow("empty_question_or_answer", f"qid {rid}: empty question")
    return q


def image_path(root: Path, name: Any) -> Path:
    """``root / name`` for a record's relative image name, refusing names that are not one.

    Raises:
        SkipRow: ``bad_image_name`` (null, not a string, empty, absolute, ``..``, NUL).
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise SkipRow("bad_image_name", repr(name)[:200])
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise SkipRow("bad_image_name", repr(name)[:200])
    return root.joinpath(*p.parts)


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    size: tuple[int, int]  # original (W, H), pixels


class ImageCache:
    """Reads and checks each image once (many questions share one image)."""

    def __init__(self) -> None:
        self._cache: dict[str, CheckedImage | SkipRow] = {}

    def load(self, path: str | os.PathLike) -> CheckedImage:
        """Bytes and original ``(W, H)`` of an image file, checked by :func:`check_image_bytes`.

        Raises:
            SkipRow: ``missing_image``, ``image_not_a_file``, ``unreadable_image`` or a reason
                of :func:`check_image_bytes`.
        """
        key = str(path)
        if key not in self._cache:
            p = Path(path)
            try:
                if p.exists() and not p.is_file():  # a folder; a FIFO would block read_bytes
                    raise IsADirectoryError(key)
                self._cache[key] = check_image_bytes(p.read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                self._cache[key] = SkipRow("missing_image", key)
            except IsADirectoryError:
                self._cache[key] = SkipRow("image_not_a_file", key)
            except OSError as e:
                self._cache[key] = SkipRow("unreadable_image", f"{key}: {e}")
            except SkipRow as e:
                self._cache[key] = SkipRow(e.reason, f"{key}: {e.detail}")
        hit = self._cache[key]
        if isinstance(hit, SkipRow):
            raise hit
        return hit


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse an original ``(W, H)`` (pixels) the trainer could not use.

    The pixel limit is Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``, read at call time); the
    aspect-ratio rule is Qwen2.5-VL's processor's, applied by calling
    :func:`vitos_verl.pruning.geometry.smart_resize` (transformers' ``smart_resize``).

    Raises:
        SkipRow: ``corrupt_image`` (no pixels), ``image_too_large`` or ``bad_aspect_ratio``.
    """
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise SkipRow("corrupt_image", f"size {w}x{h}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise SkipRow("image_too_large", f"{w}x{h} = {w * h} pixels > PIL.Image.MAX_IMAGE_PIXELS {limit}")
    try:
        smart_resize(w, h)
    except ValueError as e:
        raise SkipRow("bad_aspect_ratio", f"{w}x{h}: {e}") from e


def check_image_bytes(data: bytes | None) -> CheckedImage:
    """Check an encoded image: size first (:func:`check_image_size`, from the header, before any
    pixel is decoded), then a full decode; returns the bytes and original ``(W, H)`` in pixels.

    Raises:
        SkipRow: ``missing_image`` (no bytes), ``corrupt_image``, ``image_too_large`` or
            ``bad_aspect_ratio``.
    """
    if data is None:
        raise SkipRow("missing_image", "no image bytes")
    if not data:
        raise SkipRow("corrupt_image", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, by name
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
                check_image_size(size)
                im.load()
    except Image.DecompressionBombError as e:
        raise SkipRow("image_too_large", str(e)[:200]) from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as e:
        raise SkipRow("corrupt_image", str(e)[:200]) from e
    return CheckedImage(data, (int(size[0]), int(size[1])))


def clip_boxes(
    boxes: list[list[float]], size: tuple[int, int], report: SplitReport, where: str = ""
) -> list[list[float]]:
    """Clip ``[x1, y1, x2, y2]`` original-pixel boxes to the ``(W, H)`` image.

    A box partly outside is clipped (``notes.boxes_clipped``); the notes are counted only
    when every box is usable.

    Raises:
        SkipRow: ``bad_box`` when a coordinate is not finite or a box has no area inside the image.
    """
    W, H = size
    out, clipped = [], 0
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise SkipRow("bad_box", f"{where}: {b}")
        c = [min(max(x1, 0.0), W), min(max(y1, 0.0), H), min(max(x2, 0.0), W), min(max(y2, 0.0), H)]
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            raise SkipRow("bad_box", f"{where}: {b} has no area inside the {W}x{H} image")
        clipped += c != [x1, y1, x2, y2]
        out.append(c)
    if clipped:
        report.note("boxes_clipped", where, clipped)
    return out


# --- source files --------------------------------------------------------------------------


def read_source_text(path: Path) -> str:
    """The text of a source file (UTF-8, a BOM dropped).

    Raises:
        SourceFileError: the file is missing, not a file, unreadable or not UTF-8 (named).
    """
    if not path.exists():
        raise SourceFileError(f"{path}: split file missing")
    if not path.is_file():
        raise SourceFileError(f"{path}: not a file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise SourceFileError(f"{path}: cannot be read ({e})") from e


def load_json_list(path: Path) -> list[Any]:
    """The records of a JSON split file: its top level must be a list.

    Raises:
        SourceFileError: the file is missing, not a file, not UTF-8, not valid JSON (e.g.
            truncated) or its top level is not a list; the message names the file.
    """
    text = read_source_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceFileError(f"{path}: not valid JSON, truncated or damaged ({e})") from e
    if not isinstance(data, list):
        what = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise SourceFileError(f"{path}: top level is {what}, expected a list of records")
    return data


def load_jsonl(path: Path) -> list[Any]:
    """The records of a JSON-lines split file, one JSON value a line (blank lines ignored);
    a value that is not an object is the converter's to count (``malformed_record``).

    Raises:
        SourceFileError: the file is missing, unreadable or not UTF-8, or a line is not valid
            JSON (e.g. the file is truncated); the message names the file and line.
    """
    records = []
    for n, line in enumerate(read_source_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SourceFileError(f"{path}: line {n} is not valid JSON, truncated or damaged ({e})") from e
    return records


def load_csv_records(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV split file with a header line, as ``{column: text}`` dicts (a row
    shorter than the header has ``None`` for its missing cells).

    Raises:
        SourceFileError: the file is missing, unreadable or not UTF-8, not parseable as CSV,
            or a ``required`` column is absent from the header (the file is named).
    """
    text = read_source_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise SourceFileError(f"{path}: CSV header {columns[:12]} lacks the columns {missing}")
        return list(reader)
    except csv.Error as e:
        raise SourceFileError(f"{path}: not a readable CSV file ({e})") from e


def first_existing(src: Path, names: Sequence[str]) -> Path:
    """``src / name`` for the first of ``names`` that exists (a split's file in the layouts a
    release is found in).

    Raises:
        SourceFileError: none exists; the message lists every path tried.
    """
    for name in names:
        if (src / name).exists():
            return src / name
    raise SourceFileError(f"split file missing: none of {[str(src / n) for n in names]}")


# --- multiple choice -----------------------------------------------------------------------


def lettered(contents: Sequence[str]) -> list[dict[str, str]]:
    """``[{"letter": "A", "content": ...}, ...]`` for option texts in order.

    >>> lettered(["Lung", "Liver"])
    [{'letter': 'A', 'content': 'Lung'}, {'letter': 'B', 'content': 'Liver'}]

    Raises:
        ValueError: more than 26 options.
    """
    if len(contents) > len(string.ascii_uppercase):
        raise ValueError(f"{len(contents)} options: more than the letters A-Z")
    return [{"letter": string.ascii_uppercase[i], "content": str(c)} for i, c in enumerate(contents)]


def answer_letter(answer: Any, options: Sequence[dict[str, str]], where: str = "") -> str:
    """The option letter a multiple-choice ground truth gives: one of the options' letters,
    case, spaces and one pair of brackets ignored (``"b"``, ``" B "``, ``"(B)"`` are ``"B"``).

    >>> answer_letter("(c)", lettered(["x", "y", "z"]))
    'C'

    Raises:
        SkipRow: ``answer_not_an_option`` (not a string, or no option has that letter).
    """
    letters = [o["letter"] for o in options]
    if isinstance(answer, str):
        a = answer.strip()
        if a.startswith("(") and a.endswith(")"):
            a = a[1:-1].strip()
        if a.upper() in letters:
            return a.upper()
    raise SkipRow("answer_not_an_option", f"{where}: answer {answer!r} is not one of {letters}"[:300])


def make_image_row(images: Sequence[tuple[CheckedImage, str]], **fields: Any) -> dict[str, Any]:
    """:func:`vitos_verl.data.make_row` for one or more checked images ``(image, path)`` in order:
    the first gives ``image_bytes`` / ``image_path`` / ``image_size``, the others ``extra_images``.

    Raises:
        ValueError: no image, or what ``make_row`` raises.
    """
    if not images:
        raise ValueError("a row needs at least one image")
    (first, path), rest = images[0], images[1:]
    return make_row(
        image_bytes=first.data,
        image_path=path,
        image_size=first.size,
        extra_images=[(im.data, p) for im, p in rest],
        **fields,
    )


# --- Hugging Face parquet layout (image bytes + question + answer) -------------------------

HF_COLUMNS = ("image", "question", "answer")


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


def check_hf_file(path: Path, columns: Sequence[str] = HF_COLUMNS, layout: str = "HF layout") -> None:
    """An HF-layout parquet file must open and hold ``columns`` (default :data:`HF_COLUMNS`).

    Raises:
        SourceFileError: unreadable parquet, or a needed column absent (the file and ``layout`` named).
    """
    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    except (OSError, pa.ArrowException) as e:
        raise SourceFileError(f"{path}: not a readable parquet file ({e})") from e
    missing = [c for c in columns if c not in names]
    if missing:
        raise SourceFileError(f"{path}: {layout} needs columns {list(columns)}, missing {missing}")


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
            q, a = question_answer(rec, report)
            data, path = hf_image_bytes(rec.get("image"))
            img = check_image_bytes(data)
            rid = rec.get("qid") if rec.get("qid") is not None else rec.get("id")
            row = make_row(
                data_source=dataset,
                split=split,
                index=len(rows),
                question=q,
                answer=a,
                image_bytes=img.data,
                image_path=path or f"{split}/{i}",
                image_size=img.size,
                answer_type=str(rec.get("answer_type") or infer_answer_type(a)),
                question_type=str(rec.get("question_type") or rec.get("content_type") or ""),
                modality=str(rec.get("modality") or ""),
                organ=str(rec.get("location") or rec.get("image_organ") or ""),
                record_id=str(rid if rid is not None else i),
            )
            if rid is not None:
                report.claim_id(str(rid), f"row {i}")
            rows.append(row)
    return rows


# --- writing -------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ParquetOutputs:
    """The ``<out>/<split>.parquet`` files and ``<out>/summary.json`` of one run, published together.

    :meth:`write` writes a split's rows (:data:`SCHEMA`, zstd) to ``<out>/.<split>.parquet.tmp``;
    :meth:`publish` removes the old summary, renames every temp file into place and writes the
    new summary (temp + rename), so a summary never describes parquet it was not written with.
    Leaving the ``with`` block removes the temp files not published: a run that crashes half
    way leaves the previous outputs as they were.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._temps: dict[str, Path] = {}

    def __enter__(self) -> ParquetOutputs:
        self.out.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)

    def write(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Write one split's rows to its temp file; returns its summary entry's ``file`` (the
        final path), ``bytes`` and ``sha256``."""
        self._temps[split] = tmp = self.out / f".{split}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp, compression="zstd")
        return {"file": str(self.out / f"{split}.parquet"), "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}

    def publish(self, summary: dict[str, Any]) -> None:
        """Rename the written splits into place, then write ``summary`` as ``summary.json``."""
        summary_path = self.out / "summary.json"
        summary_path.unlink(missing_ok=True)  # never left beside parquet it does not describe
        for split, tmp in self._temps.items():
            os.replace(tmp, self.out / f"{split}.parquet")
        self._temps.clear()
        atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


# --- CLI -----------------------------------------------------------------------------------

Converter = Callable[[list[Any], str, argparse.Namespace, SplitReport], list[dict[str, Any]]]
Loader = Callable[[Path, Any], list[Any]]


def parser(
    dataset: str,
    default_src: str,
    splits: tuple[str, ...],
    layouts: str = "release layout or Hugging Face parquet layout",
    default_splits: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """The CLI options every converter shares (``--src --out --splits --limit``); a converter adds its own
    (SLAKE: ``--lang``, ``--box-rule``), so every flag in a ``--help`` does something. ``layouts``
    names the source layouts the converter reads (shown in ``--help``); ``default_splits`` the
    splits converted without ``--splits`` (default: all of ``splits``)."""
    p = argparse.ArgumentParser(
        prog=f"python -m data_prep.{dataset}",
        description=f"Convert {dataset} ({layouts}) to verl parquet.",
    )
    p.add_argument("--src", type=Path, default=Path(default_src), help=f"dataset folder ({layouts})")
    p.add_argument("--out", type=Path, default=Path("outputs/data") / dataset, help="output folder")
    default = ",".join(default_splits or splits)
    p.add_argument("--splits", default=default, help=f"comma-separated, from {','.join(splits)} (default: {default})")
    p.add_argument("--limit", type=int, default=0, help="keep at most N rows per split (0: all)")
    return p


def run(
    dataset: str,
    args: argparse.Namespace,
    convert: Converter,
    release_files: dict[str, Any],
    *,
    load: Loader | None = None,
    hf_layout: bool = True,
) -> dict[str, Any]:
    """Convert every requested split, write ``<out>/<split>.parquet`` and ``<out>/summary.json``.

    First every asked split's source is read and checked (release layout: the JSON file
    ``release_files[split]`` under ``--src``, loaded with :func:`load_json_list`, or whatever
    ``load(src, release_files[split])`` returns when the release has another format (CSV,
    JSON lines, a folder of files); HF parquet layout, detected by any ``*.parquet`` under
    ``--src`` unless ``hf_layout`` is false: :func:`check_hf_file`), so a whole-file problem
    stops the run before anything is written. Then each split is converted
    by ``convert(records, split, args, report)`` (or :func:`convert_hf`) into a temp parquet;
    at the end the old summary is removed, the parquet files renamed into place and the new
    summary written (temp + rename). The summary gives, per split, the row accounting, the
    ``box_rules`` distribution of the written rows, ``image_counts`` (written rows by number
    of images, e.g. ``{"1": 1581, "2": 236}``) and each parquet's size and sha256.

    Raises:
        FileNotFoundError: ``--src`` does not exist.
        DataPrepError: no split or an unknown split asked for (a ``ValueError``).
        SourceFileError: a split's source file is missing or unusable (named in the message).
        AssertionError: ``rows_in != rows_out + skipped + filtered`` (a converter bug).
    """
    src: Path = args.src
    if not src.exists():
        raise FileNotFoundError(f"{dataset}: source folder {src} does not exist")
    splits = list(dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip()))
    if not splits:
        raise DataPrepError(f"{dataset}: no split asked for (--splits {args.splits!r})")
    hf = hf_parquet_files(src) if hf_layout else {}
    sources: dict[str, Any] = {}
    if hf:
        for split in splits:
            if split not in hf:
                raise SourceFileError(f"{dataset}: no parquet for split {split!r} under {src} (found {sorted(hf)})")
            for f in hf[split]:
                check_hf_file(f)
            sources[split] = hf[split]
    else:
        unknown = [s for s in splits if s not in release_files]
        if unknown:
            raise DataPrepError(f"{dataset}: unknown split(s) {unknown} (choose from {sorted(release_files)})")
        for split in splits:
            name = release_files[split]
            sources[split] = load(src, name) if load else load_json_list(src / name)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    options = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in ("src", "out")
    }
    summary: dict[str, Any] = {
        "dataset": dataset,
        "src": str(src),
        "layout": "hf_parquet" if hf else "release",
        "options": options,
        "splits": {},
    }
    with ParquetOutputs(out) as outputs:
        for split in splits:
            report = SplitReport()
            if hf:
                rows = convert_hf(dataset, sources[split], split, report)
            else:
                rows = convert(sources.pop(split), split, args, report)
            if args.limit and len(rows) > args.limit:
                report.filtered["limit"] += len(rows) - args.limit
                rows = rows[: args.limit]
            report.rows_out = len(rows)
            report.check(f"{dataset}/{split}")
            rules = Counter(r["extra_info"]["box_rule"] for r in rows)
            n_images = Counter(len(r["images"]) for r in rows)
            written = outputs.write(split, rows)
            del rows
            summary["splits"][split] = {
                **written,
                "box_rules": {r: rules.get(r, 0) for r in ("named", "none", "all")},
                "image_counts": {str(k): n_images[k] for k in sorted(n_images)},
                **report.as_dict(),
            }
        outputs.publish(summary)
    print_summary(summary)
    return summary


def cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a converter's ``main``; a bad option or a missing or unusable source is one line on
    stderr and exit status 2."""
    try:
        main(None)
    except (DataPrepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def print_summary(summary: dict[str, Any]) -> None:
    """Rows in/out, skip and filter reasons, box rules and notes of each split, on stdout."""
    print(f"== {summary['dataset']} ({summary['layout']} layout, {summary['src']})")
    for split, s in summary["splits"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
        filtered = ", ".join(f"{k}={v}" for k, v in s["filtered"].items()) or "none"
        print(
            f"  {split:5s} rows_in={s['rows_in']:6d} rows_out={s['rows_out']:6d} skipped: {skipped}; filtered: {filtered}"
        )
        if any(s["box_rules"][r] for r in ("named", "all")):
            print("        box rules: " + ", ".join(f"{k}={v}" for k, v in s["box_rules"].items()))
        if any(k != "1" for k in s.get("image_counts", {})):
            print("        rows by image count: " + ", ".join(f"{k}={v}" for k, v in s["image_counts"].items()))
        if s["notes"]:
            print("        notes: " + ", ".join(f"{k}={v}" for k, v in s["notes"].items()))
        if s["duplicate_ids"]:
            print(f"        duplicate ids (written once): {', '.join(s['duplicate_ids'][:10])}")
