"""SLAKE 1.0 -> verl parquet, with ground-truth boxes from ``detection.json``.

Release layout (``../shared/data/README.md``): ``{train,validate,test}.json`` and
``imgs/xmlabN/{source.jpg,detection.json}``; boxes are ``{label: [x, y, w, h]}`` in pixels
of ``source.jpg`` and become ``[x1, y1, x2, y2]`` original-image pixels. Which boxes a
question gets is :mod:`data_prep.slake_evidence`'s rule (``--box-rule evidence``, default:
the boxes of the organ or finding it is about, else none; ``legacy``: the boxes whose label
it names, else every box of its image); ``box_rule`` of each row says which case it is.

    python -m data_prep.slake --src ../shared/data/slake --out outputs/data/slake
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import ImageCache, SkipRow, SplitReport, cli, clip_boxes, image_path, parser, question_answer, run
from data_prep.slake_evidence import BOX_RULE_CHOICES, DetBox, parse_detection, select_boxes
from vitos_verl.data import make_row

DATASET = "slake"
RELEASE_SPLITS = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def read_detection(path: Path) -> list[DetBox] | None:
    """Boxes of a SLAKE ``detection.json`` (``[x1, y1, x2, y2]``, original pixels); ``None``
    when the file does not exist. Entries that are not a usable box come back with
    ``box=None`` (see :func:`data_prep.slake_evidence.parse_detection`).

    Raises:
        SkipRow: ``malformed_detection`` when the file cannot be read, is not UTF-8 JSON, or
            is not a list of ``{label: [x, y, w, h]}`` objects.
    """
    if not path.exists():
        return None
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
        return parse_detection(items, str(path))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SkipRow("malformed_detection", f"{path}: {e}"[:300]) from e


class _Detections:
    """``read_detection`` once per image folder; a malformed file's error is replayed."""

    def __init__(self, report: SplitReport) -> None:
        self._cache: dict[Path, list[DetBox] | SkipRow] = {}
        self._report = report

    def get(self, folder: Path) -> list[DetBox]:
        if folder not in self._cache:
            try:
                dets = read_detection(folder / "detection.json")
                if dets is None:
                    self._report.note("detection_missing", str(folder))
                    dets = []
                bad = [d for d in dets if d.box is None]
                if bad:
                    self._report.note("detection_bad_entries", f"{folder}: {bad[0].problem}", len(bad))
                self._cache[folder] = dets
            except SkipRow as e:
                self._cache[folder] = e
        hit = self._cache[folder]
        if isinstance(hit, SkipRow):
            raise hit
        return hit


def convert_release(
    records: list[Any], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of one SLAKE split from its release-layout records (one row per record)."""
    src: Path = args.src
    box_rule = getattr(args, "box_rule", "evidence")
    images = ImageCache()
    detections = _Detections(report)
    rows = []
    for n, rec in enumerate(tqdm(records, desc=f"slake/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not all(k in rec for k in ("img_name", "question", "answer")):
                raise SkipRow("malformed_record", f"record {n}: {rec!r}"[:200])
            lang = rec.get("q_lang", "en")
            if not isinstance(lang, str):
                raise SkipRow("malformed_record", f"record {n}: q_lang {lang!r}")
            if args.lang != "all" and lang != args.lang:
                report.filtered[f"lang_{lang}"] += 1
                continue
            question, answer = question_answer(rec, report)
            path = image_path(src / "imgs", rec["img_name"])
            img = images.load(path)
            sel = select_boxes(box_rule, question, answer, detections.get(path.parent), rec)
            bad = [d for d in sel.boxes if d.box is None]
            if bad:
                raise SkipRow("bad_box", f"qid {rec.get('qid')}: {path.parent / 'detection.json'}: {bad[0].problem}")
            where = f"qid {rec.get('qid')} {rec['img_name']}"
            gt_boxes = clip_boxes([list(d.box) for d in sel.boxes], img.size, report, where)
            record_id = "" if rec.get("qid") is None else str(rec["qid"])
            row = make_row(
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=answer,
                image_bytes=img.data,
                image_path=rec["img_name"],
                image_size=img.size,
                answer_type=rec.get("answer_type") or "OPEN",
                question_type=rec.get("content_type") or "",
                gt_boxes=gt_boxes,
                box_labels=sel.labels,
                box_rule=sel.rule,
                modality=rec.get("modality") or "",
                organ=rec.get("location") or "",
                lang=lang,
                record_id=record_id,
            )
            report.claim_id(record_id, f"record {n}")
            rows.append(row)
            report.note(f"box_evidence_{sel.how}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert SLAKE (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/slake", tuple(RELEASE_SPLITS))
    p.add_argument("--lang", default="en", choices=("en", "zh", "all"), help="question language to keep")
    p.add_argument(
        "--box-rule",
        choices=BOX_RULE_CHOICES,
        default="evidence",
        help="evidence: boxes of the organ/finding the question or answer is about, else none; "
        "legacy: boxes whose label is named, else every box of the image",
    )
    return run(DATASET, p.parse_args(argv), convert_release, RELEASE_SPLITS)


if __name__ == "__main__":
    cli(main)
