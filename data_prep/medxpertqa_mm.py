"""MedXpertQA MM -> verl parquet (five-option multiple choice; one to six images a question).

Two release layouts of the same JSON lines, one question a line:

* Hugging Face ``TsinghuaC3I/MedXpertQA`` (what MedEvalKit loads): ``MM/test.jsonl`` (2,000
  questions), ``MM/dev.jsonl`` (5), ``images.zip`` -> ``images/``; ``options`` is
  ``{"A": text, ...}``, ``label`` a letter, ``images`` a list of file names.
* GitHub ``eval/data`` of the MedXpertQA repository: ``medxpertqa_mm_input.jsonl`` (the same 2,000)
  and ``medxpertqa_sampled_mm_input.jsonl``; ``options`` is ``[{letter, content}]``, ``label``
  ``[letter]``, ``images`` ``[{image_path}]`` (../shared/data/medxpertqa_mm_text holds these,
  text only).

Images are ``<images>/<name>`` (``--images``, default ``<src>/images``); every image of a
question goes into ``images`` in the listed order and both prompts start with one ``<image>``
placeholder per image. The question text already ends with its "Answer Choices: (A) ..." line;
it is kept as is (MedEvalKit also adds its own option list after it).

MedEvalKit (https://github.com/alibaba-damo-academy/MedEvalKit, ``utils/MedXpertQA/MedXpertQA.py``
at commit ``9b12e3b34232a8779cc1275417bf4f72f03d28e0``, read for this module) evaluates
``load_dataset("TsinghuaC3I/MedXpertQA", "MM")["test"]`` (split ``test`` here, read from
``MM/test.jsonl``, else ``test.jsonl``, else ``medxpertqa_mm_input.jsonl``), every image from
``<dataset_path>/images/``, ``choices = ["A. <text>", ...]`` (``extra_info.choices``), answer the
``label`` letter.

    python -m data_prep.medxpertqa_mm --src /data/MedXpertQA --out outputs/data/medxpertqa_mm
    python -m data_prep.medxpertqa_mm --src ../shared/data/medxpertqa_mm_text --images /data/MedXpertQA/images
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import (
    ImageCache,
    SkipRow,
    SplitReport,
    answer_letter,
    cli,
    first_existing,
    image_path,
    load_jsonl,
    make_image_row,
    parser,
    question_text,
    run,
)

DATASET = "medxpertqa_mm"
# split -> the file names it is found under, first match wins (HF layout, then GitHub eval/data)
RELEASE_SPLITS: dict[str, tuple[str, ...]] = {
    "test": ("MM/test.jsonl", "test.jsonl", "medxpertqa_mm_input.jsonl"),
    "dev": ("MM/dev.jsonl", "dev.jsonl"),
    "test_sampled": ("medxpertqa_sampled_mm_input.jsonl",),
}


def load_split(src: Path, names: tuple[str, ...]) -> list[Any]:
    """Records of the first of ``names`` under ``src`` that exists (JSON lines).

    Raises:
        SourceFileError: none exists, or the file is unusable (see :func:`data_prep.common.load_jsonl`).
    """
    return load_jsonl(first_existing(src, names))


def _options(value: Any, rid: str) -> list[dict[str, str]]:
    """``[{letter, content}]`` from the HF ``{letter: text}`` or the GitHub ``[{letter, content}]`` form."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(o, dict) for o in value):
        pairs = [(o.get("letter"), o.get("content")) for o in value]
    else:
        pairs = []
    if not pairs or not all(isinstance(k, str) and k.strip() and isinstance(v, str) for k, v in pairs):
        raise SkipRow("malformed_record", f"{rid}: options {value!r}"[:200])
    return [{"letter": k.strip(), "content": v} for k, v in pairs]


def _image_names(value: Any, rid: str) -> list[Any]:
    if not isinstance(value, list):
        raise SkipRow("malformed_record", f"{rid}: images {value!r}"[:200])
    if not value:
        raise SkipRow("missing_image", f"{rid}: no image listed")
    return [v.get("image_path") if isinstance(v, dict) else v for v in value]


def convert_release(
    records: list[Any], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of one MedXpertQA MM split (one row per question, every image, answer = label letter)."""
    root = Path(args.images) if args.images else args.src / "images"
    cache = ImageCache()
    rows = []
    for n, rec in enumerate(tqdm(records, desc=f"{DATASET}/{split}", unit="row", leave=False)):
        report.rows_in += 1
        with report.guard():
            if not isinstance(rec, dict) or not all(k in rec for k in ("question", "options", "label", "images")):
                raise SkipRow("malformed_record", f"record {n}: {rec!r}"[:200])
            rid = str(rec.get("id") if rec.get("id") is not None else f"record {n}")
            question = question_text(rec)
            options = _options(rec["options"], rid)
            label = rec["label"]
            if isinstance(label, list):
                label = label[0] if len(label) == 1 else label  # several letters: not one option
            letter = answer_letter(label, options, rid)
            names = _image_names(rec["images"], rid)
            images = [(cache.load(image_path(root, name)), name) for name in names]
            row = make_image_row(
                images,
                data_source=DATASET,
                split=split,
                index=len(rows),
                question=question,
                answer=letter,
                answer_type="CHOICE",
                question_type=str(rec.get("question_type") or ""),
                organ=str(rec.get("body_system") or ""),
                options=options,
                choices=[f"{o['letter']}. {o['content']}" for o in options],
                record_id=rid,
            )
            report.claim_id(rid, f"record {n}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert MedXpertQA MM (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/medxpertqa_mm_text", tuple(RELEASE_SPLITS), "JSON-lines layouts", ("test",))
    p.add_argument("--images", default="", help="folder holding the image files (default: <src>/images)")
    return run(DATASET, p.parse_args(argv), convert_release, RELEASE_SPLITS, load=load_split, hf_layout=False)


if __name__ == "__main__":
    cli(main)
