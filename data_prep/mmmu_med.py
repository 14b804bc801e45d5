"""MMMU, Health & Medicine subjects -> verl parquet (multiple choice; one to seven images a question).

Hugging Face layout of ``MMMU/MMMU``: ``<Subject>/{dev,validation,test}-NNNNN-of-NNNNN.parquet``
with columns ``id, question, options`` (a Python-literal list of strings), ``explanation,
image_1 .. image_7`` (``{bytes, path}`` or null), ``img_type, answer, topic_difficulty,
question_type`` (``"multiple-choice"`` / ``"open"``), ``subfield``. The question keeps its
``<image N>`` markers; every image present goes into ``images`` in ``image_N`` order and both
prompts start with one ``<image>`` placeholder per image. An ``<image N>`` named in the question
or an option whose ``image_N`` is null makes the record ``missing_image``.

MedEvalKit (https://github.com/alibaba-damo-academy/MedEvalKit at commit
``9b12e3b34232a8779cc1275417bf4f72f03d28e0``, read for this module: ``benchmarks.py``,
``utils/MMMU/MMMU.py``, ``eval_val.py``, ``eval_test.py``, ``data_utils.py``,
``eval_utils.py``) runs "MMMU-Medical-val" on the ``validation`` split of the five subjects of
``DOMAIN_CAT2SUB_CAT["Health and Medicine"]`` (the default split here, ``val``) and
"MMMU-Medical-test" on ``test`` with gold answers from its own ``utils/MMMU/answer.json`` (here
``--splits test --test-answers answer.json``; at that commit ``eval_test.py`` calls
``evaluate(samples, gold_answers)`` on a one-argument ``evaluate``, so its test path fails).
Its multiple-choice options are ``eval(options)`` lettered A, B, ...; the judge takes the option
texts (``extra_info.choices``) and the answer letter. Two differences, on purpose: MedEvalKit
gives the model only ``image_1`` (``process_single_sample``; its test for images in the options
looks for ``<img='...'>``, which MMMU does not use), this converter every image; and MedEvalKit
also scores open questions, by MMMU's ``eval_open``, which :func:`vitos_verl.eval.protocols.judge`
does not reproduce (it refuses MMMU open questions under ``medevalkit``), so open questions are counted as ``filtered.open_question`` by default and kept
as ``OPEN`` rows, answer text as given, with ``--open-questions keep``.

    python -m data_prep.mmmu_med --src /data/MMMU --out outputs/data/mmmu_med            # val
    python -m data_prep.mmmu_med --src /data/MMMU --splits test --test-answers MedEvalKit/utils/MMMU/answer.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.common import (
    DataPrepError,
    SkipRow,
    SourceFileError,
    SplitReport,
    answer_letter,
    check_image_bytes,
    cli,
    hf_image_bytes,
    lettered,
    make_image_row,
    parser,
    question_answer,
    run,
)

DATASET = "mmmu_med"
SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
RELEASE_SPLITS = {"val": "validation", "dev": "dev", "test": "test"}
COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
MAX_IMAGES = 7
_MARKER = re.compile(r"<image (\d+)>")


def load_split(src: Path, part: str, subjects: tuple[str, ...] = SUBJECTS) -> list[dict[str, Any]]:
    """Records of the parquet files ``<src>/<Subject>/<part>-*.parquet`` of each subject, in
    subject order (images as ``{bytes, path}`` dicts in memory).

    Raises:
        SourceFileError: a subject without such a file, an unreadable parquet, or one without
            the :data:`COLUMNS` (the file is named).
    """
    records = []
    for subject in subjects:
        files = sorted((src / subject).glob(f"{part}-*.parquet"))
        if not files:
            raise SourceFileError(f"{src / subject}: no {part}-*.parquet (MMMU/MMMU layout)")
        for f in files:
            try:
                table = pq.read_table(f)
            except (OSError, pa.ArrowException) as e:
                raise SourceFileError(f"{f}: not a readable parquet file ({e})") from e
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise SourceFileError(f"{f}: MMMU layout needs columns {list(COLUMNS)}, missing {missing}")
            records.extend(table.to_pylist())
    return records


def _literal_list(value: Any, rid: str, what: str) -> list[str]:
    try:
        items = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError) as e:
        raise SkipRow("malformed_record", f"{rid}: {what} {value!r}"[:200]) from e
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise SkipRow("malformed_record", f"{rid}: {what} {value!r}"[:200])
    return items


def convert_split(
    records: list[dict[str, Any]],
    split: str,
    args: argparse.Namespace,
    report: SplitReport,
    gold: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of one MMMU split's Health & Medicine records (multiple choice: answer = option
    letter); on split ``test`` the answers come from ``gold`` (:func:`load_test_answers`)."""
    gold = gold if split == "test" else None
    rows = []
    for n, rec in enumerate(tqdm(records, desc=f"{DATASET}/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise SkipRow("malformed_record", f"record {n}: no id")
            rid = rec["id"]
            if rec.get("question_type") not in ("multiple-choice", "open"):
                raise SkipRow("malformed_record", f"{rid}: question_type {rec.get('question_type')!r}")
            choice = rec["question_type"] == "multiple-choice"
            if not choice and args.open_questions == "filter":
                report.filtered["open_question"] += 1
                continue
            if gold is not None:
                if rid not in gold:
                    raise SkipRow("malformed_record", f"{rid}: no answer in --test-answers")
                rec = {**rec, "answer": gold[rid].get("ground_truth")}
            question, answer = question_answer(rec, report)
            texts = _literal_list(rec.get("options"), rid, "options") if choice else []
            options = lettered(texts)
            if choice:
                answer = answer_letter(answer, options, rid)
            needed = {int(k) for k in _MARKER.findall(" ".join([question, *texts]))}
            images = []
            for k in range(1, MAX_IMAGES + 1):
                data, path = hf_image_bytes(rec.get(f"image_{k}"))
                if data is None:
                    if k in needed:
                        raise SkipRow("missing_image", f"{rid}: <image {k}> named but image_{k} is empty")
                    continue
                images.append((check_image_bytes(data), path or f"{rid}/image_{k}"))
            if not images:
                raise SkipRow("missing_image", f"{rid}: no image")
            img_type = rec.get("img_type")
            try:
                modality = ", ".join(_literal_list(img_type, rid, "img_type")) if img_type else ""
            except SkipRow:
                modality = str(img_type)
            row = make_image_row(
                images,
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=answer,
                answer_type="CHOICE" if choice else "OPEN",
                question_type=str(rec.get("question_type") or ""),
                modality=modality,
                options=options,
                choices=texts,
                record_id=rid,
            )
            report.claim_id(rid, f"record {n}")
            rows.append(row)
    return rows


def load_test_answers(path: str) -> dict[str, dict[str, Any]]:
    """MedEvalKit's ``utils/MMMU/answer.json``: ``{id: {"question_type", "ground_truth"}}``.

    Raises:
        SourceFileError: unreadable, not JSON, or not that shape (the file is named).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceFileError(f"{path}: MMMU test answers unreadable ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SourceFileError(f"{path}: expected {{id: {{question_type, ground_truth}}}}")
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert MMMU Health & Medicine (CLI arguments ``argv``); returns the summary written to
    ``<out>/summary.json``.

    Raises:
        FileNotFoundError, SourceFileError: see :func:`data_prep.common.run`; an unusable
            ``--test-answers`` file.
        DataPrepError: an unknown subject, or split ``test`` without ``--test-answers`` (MMMU's
            test answers are hidden).
    """
    p = parser(DATASET, "../shared/data/mmmu", tuple(RELEASE_SPLITS), "MMMU/MMMU Hugging Face parquet layout", ("val",))
    p.add_argument(
        "--subjects", default=",".join(SUBJECTS), help="comma list of MMMU subjects (default: Health & Medicine)"
    )
    p.add_argument(
        "--open-questions",
        choices=("filter", "keep"),
        default="filter",
        help="open (non multiple-choice) questions: count as filtered (default) or keep as OPEN rows",
    )
    p.add_argument("--test-answers", default="", help="split test: MedEvalKit's utils/MMMU/answer.json")
    args = p.parse_args(argv)
    subjects = tuple(s.strip() for s in args.subjects.split(",") if s.strip())
    unknown = [s for s in subjects if s not in SUBJECTS]
    if not subjects or unknown:
        raise DataPrepError(f"{DATASET}: subjects must be among {SUBJECTS}, got {list(subjects)}")
    if "test" in (s.strip() for s in args.splits.split(",")) and not args.test_answers:
        raise DataPrepError(f"{DATASET}: MMMU test answers are hidden; give --test-answers (MedEvalKit's answer.json)")
    gold = load_test_answers(args.test_answers) if args.test_answers else None
    return run(
        DATASET,
        args,
        lambda records, split, a, report: convert_split(records, split, a, report, gold),
        RELEASE_SPLITS,
        load=lambda src, part: load_split(src, part, subjects),
        hf_layout=False,
    )


if __name__ == "__main__":
    cli(main)
