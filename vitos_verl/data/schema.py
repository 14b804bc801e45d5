"""The verl parquet row of ViToS (docs/design.md section 4).

One row per (image(s), question) record carries both streams: ``prompt`` is the grounding
prompt (the first pass), ``reasoning_prompt`` the reasoning prompt; both are rendered from
the same record by :mod:`vitos_verl.data.prompts`. Ground-truth boxes are ``[x1, y1, x2, y2]``
in original-image pixels; ``image_size`` is the original ``(W, H)`` of the first image.
A multi-image question (MMMU, MedXpertQA) lists every image in ``images``, in order, and its
prompts carry one ``<image>`` placeholder per image; boxes, if any, refer to the first image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vitos_verl.data import prompts

ABILITY = "medical_vqa"
BOX_RULES = ("named", "all", "none")  # which SLAKE boxes a question got; "none": dataset has none


def make_row(
    *,
    data_source: str,
    split: str,
    index: int,
    question: str,
    answer: str,
    image_bytes: bytes,
    image_path: str,
    image_size: tuple[int, int],
    answer_type: str = "OPEN",
    question_type: str = "",
    gt_boxes: Sequence[Sequence[float]] = (),
    box_labels: Sequence[str] = (),
    box_rule: str = "none",
    modality: str = "",
    organ: str = "",
    lang: str = "en",
    record_id: str = "",
    options: Sequence[dict] | None = None,
    extra_images: Sequence[tuple[bytes, str]] = (),
    choices: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One parquet row in verl's RLHF schema plus the ViToS fields.

    Args:
        image_bytes: the encoded image file, embedded as is (no re-encoding).
        image_size: original ``(W, H)`` in pixels.
        answer_type: normalised ``"OPEN"`` / ``"CLOSED"`` / ``"CHOICE"`` (strip, upper).
        gt_boxes: ``[[x1, y1, x2, y2], ...]`` original pixels, already clipped to the image.
        box_rule: one of :data:`BOX_RULES`.
        options: ``[{"letter", "content"}, ...]`` of a multiple-choice question (both prompts list them).
        extra_images: ``(encoded bytes, path)`` of the images after the first, in order; the
            prompts get one ``<image>`` placeholder per image (first plus extras).
        choices: the option strings exactly as MedEvalKit builds them for the dataset (what
            :func:`vitos_verl.eval.protocols.judge` takes as ``choices``), kept in
            ``extra_info.choices``; empty when the dataset has none.

    Raises:
        ValueError: empty question or answer, bad ``box_rule`` or ``image_size``, an extra image
            without bytes.
    """
    if not str(answer).strip():
        raise ValueError("empty answer")
    if box_rule not in BOX_RULES:
        raise ValueError(f"box_rule must be one of {BOX_RULES}, got {box_rule!r}")
    w, h = (int(v) for v in image_size)
    if w <= 0 or h <= 0:
        raise ValueError(f"bad image size {image_size}")
    atype = str(answer_type or "OPEN").strip().upper()
    opts = [{"letter": str(o["letter"]), "content": str(o["content"])} for o in (options or [])]
    images = [{"bytes": image_bytes, "path": image_path}]
    for data, path in extra_images:
        if not data:
            raise ValueError(f"extra image {path!r} has no bytes")
        images.append({"bytes": data, "path": str(path)})
    return {
        "data_source": data_source,
        "prompt": prompts.chat("grounding", question, atype, opts, len(images)),
        "reasoning_prompt": prompts.chat("reasoning", question, atype, opts, len(images)),
        "images": images,
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": str(answer).strip()},
        "extra_info": {
            "split": split,
            "index": int(index),
            "record_id": str(record_id),
            "question": question.strip(),
            "answer": str(answer).strip(),
            "answer_type": atype,
            "question_type": str(question_type or ""),
            "gt_boxes": [[float(v) for v in b] for b in gt_boxes],
            "box_labels": [str(x) for x in box_labels],
            "box_rule": box_rule,
            "image_size": [w, h],
            "modality": str(modality or ""),
            "organ": str(organ or ""),
            "lang": lang,
            "options": opts,
            "choices": [str(c) for c in (choices or [])],
        },
    }
