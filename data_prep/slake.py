"""SLAKE 1.0 -> verl parquet, with ground-truth boxes from ``detection.json``.

Release layout (``../shared/data/README.md``): ``{train,validate,test}.json`` and
``imgs/xmlabN/{source.jpg,detection.json}``; boxes are ``{label: [x, y, w, h]}`` in pixels
of ``source.jpg`` and become ``[x1, y1, x2, y2]``. A question gets the boxes whose label it
(or its answer) names, else every box of its image (``box_rule`` says which).

    python -m data_prep.slake --src ../shared/data/slake --out outputs/data/slake
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import ImageCache, SkipRow, SplitReport, clip_boxes, parser, run
from vitos_verl.data import make_row

DATASET = "slake"
RELEASE_SPLITS = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def read_detection(path: Path) -> list[tuple[str, list[float]]]:
    """``[(label, [x1, y1, x2, y2]), ...]`` from a SLAKE ``detection.json`` (original pixels).

    Raises:
        SkipRow: ``malformed_detection`` when the file is not a list of ``{label: [x, y, w, h]}``.
    """
    if not path.exists():
        return []
    try:
        items = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise SkipRow("malformed_detection", f"{path}: {e}") from e
    if not isinstance(items, list):
        raise SkipRow("malformed_detection", f"{path}: not a list")
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise SkipRow("malformed_detection", f"{path}: {it!r}")
        for label, xywh in it.items():
            if not (isinstance(xywh, list) and len(xywh) == 4 and all(isinstance(v, (int, float)) for v in xywh)):
                raise SkipRow("malformed_detection", f"{path}: {label}: {xywh!r}")
            x, y, w, h = (float(v) for v in xywh)
            out.append((str(label), [x, y, x + w, y + h]))
    return out


def select_boxes(question: str, answer: str, boxes: list[tuple[str, list[float]]]) -> tuple[list, list, str]:
    """Boxes a question is about: those whose label the question or answer names, else all.

    Returns:
        ``(boxes, labels, rule)`` with rule ``"named"``, ``"all"`` or ``"none"`` (no boxes).
    """
    if not boxes:
        return [], [], "none"
    text = f"{question} {answer}".lower()
    named = [(lab, b) for lab, b in boxes if re.search(rf"\b{re.escape(lab.lower())}\b", text)]
    chosen, rule = (named, "named") if named else (boxes, "all")
    return [b for _, b in chosen], [lab for lab, _ in chosen], rule


def convert_release(src: Path, split: str, args: argparse.Namespace, report: SplitReport) -> list[dict[str, Any]]:
    """Rows of one SLAKE split from the release layout."""
    if split not in RELEASE_SPLITS:
        raise ValueError(f"slake: unknown split {split!r} (choose from {sorted(RELEASE_SPLITS)})")
    records = json.loads((src / RELEASE_SPLITS[split]).read_text())
    images = ImageCache()
    detections: dict[str, Any] = {}
    rows = []
    for rec in tqdm(records, desc=f"slake/{split}", unit="row", leave=False):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not all(k in rec for k in ("img_name", "question", "answer")):
                raise SkipRow("malformed_record", repr(rec)[:200])
            lang = rec.get("q_lang", "en")
            if args.lang != "all" and lang != args.lang:
                report.filtered[f"lang_{lang}"] += 1
                continue
            question, answer = rec["question"], str(rec["answer"])
            if not isinstance(question, str) or not question.strip() or not answer.strip():
                raise SkipRow("empty_question_or_answer", f"qid {rec.get('qid')}")
            img_path = src / "imgs" / rec["img_name"]
            img = images.load(img_path)
            folder = img_path.parent
            if folder not in detections:
                try:
                    detections[folder] = read_detection(folder / "detection.json")
                except SkipRow as e:
                    detections[folder] = []
                    report.notes["malformed_detection"] += 1
                    report.examples.setdefault("malformed_detection", str(e))
            boxes, labels, rule = select_boxes(question, answer, detections[folder])
            rows.append(
                make_row(
                    data_source=DATASET,
                    split=split,
                    index=len(rows),
                    question=question,
                    answer=answer,
                    image_bytes=img.data,
                    image_path=rec["img_name"],
                    image_size=img.size,
                    answer_type=rec.get("answer_type", "OPEN"),
                    question_type=rec.get("content_type", ""),
                    gt_boxes=clip_boxes(boxes, img.size, report),
                    box_labels=labels,
                    box_rule=rule,
                    modality=rec.get("modality", ""),
                    organ=rec.get("location", ""),
                    lang=lang,
                    record_id=str(rec.get("qid", "")),
                )
            )
            report.notes[f"box_rule_{rule}"] += 1
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(DATASET, "../shared/data/slake", tuple(RELEASE_SPLITS)).parse_args(argv)
    return run(DATASET, args, convert_release)


if __name__ == "__main__":
    main()
