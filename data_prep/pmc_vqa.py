"""PMC-VQA -> verl parquet (four-option multiple choice; evaluation splits).

Release layout (Hugging Face dataset repos ``xmcmic/PMC-VQA`` and its copy ``RadGenome/PMC-VQA``):
CSV metafiles beside image zips, one row per question.

* version 2 (non-compound images): ``test_2.csv`` / ``train_2.csv``, columns ``index,
  Figure_path, Caption, Question, Choice A, Choice B, Choice C, Choice D, Answer, split``;
  images from ``images_2.zip``, looked up under ``figures/`` then ``images/``.
* version 1: ``test_clean.csv`` (the 2,000-question clean test set of the PMC-VQA paper),
  ``test.csv``, ``train.csv``, columns ``Figure_path, Question, Answer, Choice A..D,
  Answer_label``; images from ``images.zip``, looked up under ``images/`` then ``figures/``.

Choice cells read ``"A:Lung"`` (some ``" A:Lung"``): the option text is the cell without its
``X:`` prefix; ``extra_info.choices`` keeps the raw cells, which MedEvalKit passes to its judge.
The ground truth is the option letter: ``Answer_label`` when the file has it, else ``Answer``
(a letter in version 2); an answer that is an option's text instead is mapped to its letter
(``notes.answer_matched_by_text``), anything else is skipped as ``answer_not_an_option``.

MedEvalKit (https://github.com/alibaba-damo-academy/MedEvalKit, ``utils/PMC_VQA/PMC_VQA.py`` at
commit ``9b12e3b34232a8779cc1275417bf4f72f03d28e0``, read for this module) evaluates
``test_2.csv`` of ``RadGenome/PMC-VQA`` (every row; header skipped, columns unpacked as above),
images ``<root>/figures/<Figure_path>``, ``choices = [Choice A, B, C, D]`` as read, answer the
``Answer`` cell as is. So split ``test`` here is ``test_2.csv``; the paper's clean set is
``test_clean``. No Hugging Face parquet layout is read: the common copies are this CSV + zip
release (parquet re-uploads such as ``mdwiratathya/PMC-VQA_small`` rename the columns and are
not what published numbers use).

    python -m data_prep.pmc_vqa --src /data/PMC-VQA --out outputs/data/pmc_vqa              # test_2.csv
    python -m data_prep.pmc_vqa --src /data/PMC-VQA --splits test_clean --images /data/PMC-VQA/images
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import (
    ImageCache,
    SkipRow,
    SourceFileError,
    SplitReport,
    answer_letter,
    cli,
    image_path,
    lettered,
    load_csv_records,
    make_image_row,
    parser,
    question_text,
    run,
)

DATASET = "pmc_vqa"
# split -> (CSV file, image folders under --src in lookup order)
SPLITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "test": ("test_2.csv", ("figures", "images")),
    "train": ("train_2.csv", ("figures", "images")),
    "test_clean": ("test_clean.csv", ("images", "figures")),
    "test_v1": ("test.csv", ("images", "figures")),
    "train_v1": ("train.csv", ("images", "figures")),
}
CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")
REQUIRED = ("Figure_path", "Question", *CHOICE_COLUMNS)
_PREFIX = re.compile(r"^\s*[A-Za-z]\s*:\s*")


def load_split(src: Path, name: str) -> list[dict[str, str]]:
    """Rows of one PMC-VQA CSV metafile ``src / name``.

    Raises:
        SourceFileError: missing or unreadable file, a column of :data:`REQUIRED` absent, or
            neither ``Answer_label`` nor ``Answer`` present (the file is named).
    """
    path = src / name
    rows = load_csv_records(path, REQUIRED)
    if rows and not {"Answer_label", "Answer"} & rows[0].keys():
        raise SourceFileError(f"{path}: CSV has neither an Answer_label nor an Answer column")
    return rows


def _ground_truth(rec: dict[str, Any], options: list[dict[str, str]], raw: list[str], report: SplitReport) -> str:
    label = rec["Answer_label"] if "Answer_label" in rec else rec.get("Answer")
    where = f"Figure_path {rec.get('Figure_path')!r}"
    try:
        return answer_letter(label, options, where)
    except SkipRow:
        text = label.strip() if isinstance(label, str) else ""
        hits = [o["letter"] for o, r in zip(options, raw) if text and text in (r.strip(), o["content"])]
        if len(hits) != 1:
            raise
        report.note("answer_matched_by_text", f"{where}: {label!r} -> {hits[0]}")
        return hits[0]


def convert_release(
    records: list[dict[str, str]], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of one PMC-VQA split from its CSV rows (one row per question, answer = option letter)."""
    src: Path = args.src
    roots = [Path(args.images)] if args.images else [src / d for d in SPLITS[split][1]]
    images = ImageCache()
    rows = []
    for n, rec in enumerate(tqdm(records, desc=f"{DATASET}/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            raw = [rec.get(c) for c in CHOICE_COLUMNS]
            if not all(isinstance(c, str) and _PREFIX.sub("", c, count=1).strip() for c in raw):
                raise SkipRow("malformed_record", f"CSV row {n + 2}: choices {raw!r}"[:200])
            options = lettered([_PREFIX.sub("", c, count=1).strip() for c in raw])
            question = question_text(rec, "Question")
            letter = _ground_truth(rec, options, raw, report)
            candidates = [image_path(root, rec["Figure_path"]) for root in roots]
            path = next((p for p in candidates if p.exists()), candidates[0])
            img = images.load(path)
            record_id = (rec.get("index") or "").strip() or str(n)
            row = make_image_row(
                [(img, rec["Figure_path"])],
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=letter,
                answer_type="CHOICE",
                options=options,
                choices=raw,
                record_id=record_id,
            )
            report.claim_id(record_id, f"CSV row {n + 2}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert PMC-VQA (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/pmc_vqa", tuple(SPLITS), "CSV + images release layout", ("test",))
    p.add_argument("--images", default="", help="folder holding the Figure_path images (default: figures/, images/)")
    files = {split: f for split, (f, _) in SPLITS.items()}
    return run(DATASET, p.parse_args(argv), convert_release, files, load=load_split, hf_layout=False)


if __name__ == "__main__":
    cli(main)
