"""VQA-RAD -> verl parquet (no boxes: the grounding stream learns from cross-feedback).

Release layout (MEVF): ``trainset.json`` / ``testset.json`` with ``images/synpic*.jpg``.
The usual 1,797-row train set is ``phrase_type`` freeform + para; ``--phrase-types all``
keeps the frame rows too. There is no official val split: ``val`` is not offered.

    python -m data_prep.vqa_rad --src ../shared/data/vqa_rad --out outputs/data/vqa_rad
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import ImageCache, SkipRow, SplitReport, cli, image_path, parser, question_answer, run
from vitos_verl.data import make_row

DATASET = "vqa_rad"
RELEASE_SPLITS = {"train": "trainset.json", "test": "testset.json"}
DEFAULT_PHRASE_TYPES = ("freeform", "para")


def convert_release(
    records: list[Any], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of one VQA-RAD split from its MEVF release-layout records (one row per record)."""
    src: Path = args.src
    phrase_types = None if args.phrase_types == "all" else set(args.phrase_types.split(","))
    images = ImageCache()
    rows = []
    for n, rec in enumerate(tqdm(records, desc=f"vqa_rad/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not all(k in rec for k in ("image_name", "question", "answer")):
                raise SkipRow("malformed_record", f"record {n}: {rec!r}"[:200])
            pt = str(rec.get("phrase_type", "")).strip()
            if phrase_types is not None and pt not in phrase_types:
                report.filtered[f"phrase_type_{pt}"] += 1
                continue
            question, answer = question_answer(rec, report)
            img = images.load(image_path(src / "images", rec["image_name"]))
            record_id = "" if rec.get("qid") is None else str(rec["qid"])
            row = make_row(
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=answer,
                image_bytes=img.data,
                image_path=rec["image_name"],
                image_size=img.size,
                answer_type=rec.get("answer_type") or "OPEN",
                question_type=str(rec.get("question_type") or "").strip(),
                organ=str(rec.get("image_organ") or "").strip(),
                record_id=record_id,
            )
            report.claim_id(record_id, f"record {n}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert VQA-RAD (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/vqa_rad", tuple(RELEASE_SPLITS))
    p.add_argument("--phrase-types", default=",".join(DEFAULT_PHRASE_TYPES), help="comma list or 'all'")
    return run(DATASET, p.parse_args(argv), convert_release, RELEASE_SPLITS)


if __name__ == "__main__":
    cli(main)
