"""OmniMedVQA -> verl parquet (multiple choice, two to four options; evaluation split).

Release layout (``OmniMedVQA.zip``, e.g. from the Hugging Face repo ``foreverbeliever/OmniMedVQA``):
``QA_information/Open-access/<dataset>.json``, each a list of
``{dataset, question_id, question_type, question, gt_answer, image_path, option_A, option_B,
option_C, option_D, modality_type}`` (``option_C`` / ``option_D`` absent when a question has
fewer options; one record in ``Chest CT Scan.json`` is reported to say ``modality``), with the
images at ``<src>/<image_path>`` (``Images/...``). The restricted-access part ships no images
and is not read.

MedEvalKit (https://github.com/alibaba-damo-academy/MedEvalKit, ``utils/OmniMedVQA/OmniMedVQA.py``
at commit ``9b12e3b34232a8779cc1275417bf4f72f03d28e0``, read for this module) evaluates every
record of every file in ``QA_information/Open-access`` (``os.listdir`` order; sorted by file
name here) as one test set: split ``test``. Its options are the ``option_X`` keys present, in
A-D order, its ``choices`` ``"A. <text>"`` (kept in ``extra_info.choices``), and the ground
truth the letter of the option whose text equals ``gt_answer`` exactly (the last one if several
do). Here too; where no option is exactly equal, a unique match ignoring case and surrounding
spaces is taken (``notes.answer_matched_loosely``) and otherwise the record is skipped as
``answer_not_an_option`` (MedEvalKit would keep the text as the answer).

    python -m data_prep.omnimedvqa --src /data/OmniMedVQA --out outputs/data/omnimedvqa
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import (
    ImageCache,
    SkipRow,
    SourceFileError,
    SplitReport,
    cli,
    image_path,
    load_json_list,
    make_image_row,
    parser,
    question_answer,
    run,
)

DATASET = "omnimedvqa"
RELEASE_SPLITS = {"test": "QA_information/Open-access"}
LETTERS = ("A", "B", "C", "D")


def load_split(src: Path, name: str) -> list[tuple[str, Any]]:
    """``(file name, record)`` for every record of the ``*.json`` files in ``src / name``, files
    in name order.

    Raises:
        SourceFileError: the folder is missing or holds no ``*.json``; a file is unusable
            (see :func:`data_prep.common.load_json_list`).
    """
    folder = src / name
    if not folder.is_dir():
        raise SourceFileError(f"{folder}: folder of OmniMedVQA QA files missing")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SourceFileError(f"{folder}: no *.json QA files")
    return [(f.name, rec) for f in files for rec in load_json_list(f)]


def _ground_truth(gt: str, options: list[dict[str, str]], report: SplitReport, where: str) -> str:
    exact = [o["letter"] for o in options if o["content"] == gt]
    if exact:
        if len(exact) > 1:
            report.note("answer_in_several_options", f"{where}: {gt!r} is options {exact}, the last one kept")
        return exact[-1]
    loose = [o["letter"] for o in options if o["content"].strip().casefold() == gt.strip().casefold()]
    if len(loose) == 1:
        report.note("answer_matched_loosely", f"{where}: {gt!r} -> {loose[0]}")
        return loose[0]
    raise SkipRow("answer_not_an_option", f"{where}: gt_answer {gt!r} vs {[o['content'] for o in options]}"[:300])


def convert_release(
    records: list[tuple[str, Any]], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of the OmniMedVQA open-access records (one row per question, answer = option letter)."""
    root = Path(args.images) if args.images else args.src
    images = ImageCache()
    rows = []
    for n, (fname, rec) in enumerate(tqdm(records, desc=f"{DATASET}/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not all(k in rec for k in ("question", "gt_answer", "image_path")):
                raise SkipRow("malformed_record", f"record {n} ({fname}): {rec!r}"[:200])
            qid = rec.get("question_id")
            record_id = f"{Path(fname).stem}/{qid if qid is not None else n}"
            question, gt = question_answer(rec, report, "question", "gt_answer")
            present = [(k, rec[f"option_{k}"]) for k in LETTERS if f"option_{k}" in rec]
            if not all(isinstance(v, str) for _, v in present):
                raise SkipRow("malformed_record", f"{record_id}: options {present!r}"[:200])
            options = [{"letter": k, "content": v} for k, v in present]
            letter = _ground_truth(gt, options, report, record_id)
            img = images.load(image_path(root, rec["image_path"]))
            row = make_image_row(
                [(img, rec["image_path"])],
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=letter,
                answer_type="CHOICE",
                question_type=str(rec.get("question_type") or ""),
                modality=str(rec.get("modality_type") or rec.get("modality") or ""),
                options=options,
                choices=[f"{o['letter']}. {o['content']}" for o in options],
                record_id=record_id,
            )
            report.claim_id(record_id, f"record {n} ({fname})")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert OmniMedVQA (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/omnimedvqa", tuple(RELEASE_SPLITS), layouts="OmniMedVQA.zip release layout")
    p.add_argument("--images", default="", help="folder the records' image_path is relative to (default: --src)")
    return run(DATASET, p.parse_args(argv), convert_release, RELEASE_SPLITS, load=load_split, hf_layout=False)


if __name__ == "__main__":
    cli(main)
