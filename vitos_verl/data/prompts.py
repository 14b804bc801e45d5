"""Prompt templates of the two streams, one place for data prep, training and evaluation.

The templates are the ``templates/*.jinja`` files beside this module (rendered with jinja2);
both start with one ``<image>`` placeholder per image (one for a single-image question), which
verl's ``RLHFDataset`` replaces by the images in order.
The wording is this project's choice: the paper's prompts are not public.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).with_name("templates")
STREAMS = ("grounding", "reasoning")


@cache
def _template(stream: str) -> jinja2.Template:
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string((TEMPLATE_DIR / f"{stream}.jinja").read_text().rstrip("\n"))


def render(
    stream: str, question: str, answer_type: str = "OPEN", options: Sequence[dict] | None = None, n_images: int = 1
) -> str:
    """User text of one stream's prompt: ``n_images`` ``<image>`` placeholders, then the question.

    >>> render("grounding", "Which film?", n_images=2).startswith("<image><image>Which film?")
    True

    Raises:
        ValueError: unknown stream, empty question or ``n_images`` < 1.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    return _template(stream).render(
        question=question.strip(), answer_type=answer_type, options=list(options or []), n_images=n_images
    )


def chat(
    stream: str, question: str, answer_type: str = "OPEN", options: Sequence[dict] | None = None, n_images: int = 1
) -> list[dict]:
    """Chat messages of one stream's prompt: ``[{"role": "user", "content": ...}]``."""
    return [{"role": "user", "content": render(stream, question, answer_type, options, n_images)}]


def to_content_list(messages: Sequence[dict]) -> list[dict]:
    """Replace each ``<image>`` placeholder by a ``{"type": "image"}`` part (as verl's dataset does).

    >>> to_content_list([{"role": "user", "content": "<image>What organ?"}])[0]["content"]
    [{'type': 'image'}, {'type': 'text', 'text': 'What organ?'}]
    """
    out = []
    for m in messages:
        parts: list[dict] = []
        for k, seg in enumerate(str(m["content"]).split("<image>")):
            if k:
                parts.append({"type": "image"})
            if seg:
                parts.append({"type": "text", "text": seg})
        out.append({"role": m["role"], "content": parts})
    return out
