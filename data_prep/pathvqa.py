"""PathVQA -> verl parquet.

Two layouts: the Hugging Face parquet one (``image`` bytes, ``question``, ``answer``), which is
how most users get PathVQA with its images, and the LXMERT release layout
(``pvqa_{train,val,test}.json``: ``{img_id, sentf: {pvqa: [q...]}, labelf: {pvqa: [{ans: score}...]}}``)
with images looked up as ``<images>/<split>/<img_id>.{jpg,png}`` (``--images``). Without
images every release row is counted as ``missing_image``: nothing is dropped silently.

    python -m data_prep.pathvqa --src /data/path-vqa            # HF parquet folder
    python -m data_prep.pathvqa --src ../shared/data/pathvqa_qa --images /data/pvqa/images
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import ImageCache, SkipRow, SplitReport, cli, infer_answer_type, parser, run
from vitos_verl.data import make_row

DATASET = "pathvqa"
RELEASE_SPLITS = {"train": "pvqa_train.json", "val": "pvqa_val.json", "test": "pvqa_test.json"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _best_label(labels: Any) -> str | None:
    if not isinstance(labels, dict) or not labels:
        return None
    return max(labels.items(), key=lambda kv: kv[1] if isinstance(kv[1], (int, float)) else float("-inf"))[0]


def _get(rec: Any, key: str, sub: str) -> Any:
    v = rec.get(key) if isinstance(rec, dict) else None
    return v.get(sub) if isinstance(v, dict) else None


def _is_id(v: Any) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool) and bool(str(v).strip())


def convert_release(
    records: list[Any], split: str, args: argparse.Namespace, report: SplitReport
) -> list[dict[str, Any]]:
    """Rows of one PathVQA split from its LXMERT-layout records (one row per question)."""
    images = ImageCache()
    img_root = Path(args.images) / split if args.images else None
    rows = []
    for rec in tqdm(records, desc=f"pathvqa/{split}", unit="image", leave=False):
        questions = _get(rec, "sentf", "pvqa")
        labels = _get(rec, "labelf", "pvqa")
        img_id = rec.get("img_id") if isinstance(rec, dict) else None
        if not isinstance(questions, list) or not isinstance(labels, list) or not _is_id(img_id):
            n = len(questions) if isinstance(questions, list) and questions else 1  # its questions, else the record
            report.rows_in += n
            for _ in range(n):
                report.skip("malformed_record", repr(rec)[:200])
            continue
        img_id = str(img_id)
        if len(questions) != len(labels):
            report.rows_in += len(questions)
            for _ in questions:
                report.skip("malformed_record", f"{img_id}: {len(questions)} questions vs {len(labels)} labels")
            continue
        if not questions:
            report.notes["records_without_questions"] += 1
        for k, (q, lab) in enumerate(zip(questions, labels)):
            report.rows_in += 1
            with report.guard():
                answer = _best_label(lab)
                if not isinstance(q, str):
                    raise SkipRow("non_string_question", f"{img_id}#{k}: {q!r}"[:200])
                if not q.strip() or not answer or not str(answer).strip():
                    raise SkipRow("empty_question_or_answer", f"{img_id}#{k}")
                if img_root is None:
                    raise SkipRow("missing_image", f"{img_id}: no --images folder given")
                if "/" in img_id or "\\" in img_id or img_id.startswith("."):
                    raise SkipRow("bad_image_name", repr(img_id))
                path = next(
                    (img_root / f"{img_id}{e}" for e in IMAGE_EXTS if (img_root / f"{img_id}{e}").exists()), None
                )
                if path is None:
                    raise SkipRow("missing_image", f"{img_root}/{img_id}.*")
                img = images.load(path)
                row = make_row(
                    data_source=DATASET,
                    split=split,
                    index=len(rows),
                    question=q,
                    answer=answer,
                    image_bytes=img.data,
                    image_path=f"{split}/{path.name}",
                    image_size=img.size,
                    answer_type=infer_answer_type(answer),
                    record_id=f"{img_id}#{k}",
                )
                report.claim_id(f"{img_id}#{k}", f"{img_id} question {k}")
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert PathVQA (CLI arguments ``argv``); returns the summary written to ``<out>/summary.json``.

    Raises:
        FileNotFoundError, DataPrepError, SourceFileError: see :func:`data_prep.common.run`.
    """
    p = parser(DATASET, "../shared/data/pathvqa_qa", tuple(RELEASE_SPLITS))
    p.add_argument("--images", default="", help="release layout: folder with <split>/<img_id>.jpg")
    return run(DATASET, p.parse_args(argv), convert_release, RELEASE_SPLITS)


if __name__ == "__main__":
    cli(main)
