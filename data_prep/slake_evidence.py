"""Which SLAKE ``detection.json`` boxes are the evidence a question asks about.

SLAKE 1.0 (Liu et al., ISBI 2021; ``../shared/data/README.md``) gives each image a list of
``{label: [x, y, w, h]}`` boxes (44 labels: organs such as ``Liver`` or ``Left Kidney``,
findings such as ``Lung Cancer`` or ``Brain Edema``) and each question the fields
``location`` (the scanned body region: ``Abdomen``, ``Lung``, ``Brain_Tissue``, ...),
``content_type`` (``Organ``, ``Abnormality``, ``Position``, ...) and ``triple``
(``['vhead', '_', '_']`` for plain questions; for knowledge questions ``['vhead', relation,
tail]`` whose head is an unnamed visual entity and whose tail is a knowledge-graph concept
such as ``respiratory system`` or ``ktail``, the answer). ``location`` never names the
evidence (every question on a chest slice, modality and plane included, has ``Lung``) and is
not used. ``content_type == 'Abnormality'`` and a ``cause``/``treat``/``symptom``/``prevent``
triple mark a question about an abnormality; a system or function tail names organs through
:data:`KG_TAIL_ORGANS`.

The **evidence** rule (default) attaches, first match wins:

1. the finding boxes the question or answer names (``Where is the pneumonia?``);
2. for a question about an abnormality (``Is the lung healthy?``, ``Which organ is abnormal,
   heart or lung?``) that names no finding itself: the findings of the organs it names, or
   every finding when it names none;
3. the organ boxes the question or answer names (``Does the picture contain spleen?``,
   answer ``Liver`` to ``What is the largest organ?``), with plurals, ``left``/``right``
   forms (SLAKE's text and labels both use the patient's side) and synonyms;
4. for a knowledge question whose ``triple`` tail is a system or function in
   :data:`KG_TAIL_ORGANS` (``Does the picture contain the organ which has the effect of
   excreting feces?``) and whose answer is not ``No``: the image's organs of that tail;
5. nothing (``box_rule = "none"``): the row trains grounding from feedback alone.

The **legacy** rule (kept for comparison) attaches the boxes whose whole label occurs in the
question or answer, else every box of the image (``box_rule = "all"``).

All boxes are ``[x1, y1, x2, y2]`` in original-image pixels. The vocabulary is the one table
below (:data:`ORGANS`, :data:`FINDINGS`, :data:`ABNORMALITY_WORDS`, :data:`TYPOS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BOX_RULE_CHOICES = ("evidence", "legacy")

# --- the vocabulary: one table --------------------------------------------------------------
# Base label (lower case, "Left "/"Right " removed) -> other words that name it.
ORGANS: dict[str, tuple[str, ...]] = {
    "liver": (),
    "spleen": (),
    "kidney": (),
    "lung": (),
    "heart": (),
    "small bowel": ("small intestine",),
    "colon": ("large bowel", "large intestine"),
    "rectum": (),
    "duodenum": (),
    "stomach": (),
    "esophagus": ("oesophagus",),
    "bladder": ("urinary bladder",),
    "larynx": (),
    "trachea": ("windpipe",),
    "tooth": (),
    "spinal cord": (),
    "brain stem": ("brainstem",),
    "mandible": (),
    "parotid": ("parotid gland",),
    "femoral head": ("femur head",),
    "temporal lobe": (),
    "eye": ("eyeball",),
    "ear": (),
    "brain": ("cerebrum",),  # no SLAKE box: the organ the brain findings lie in
}
# Base label -> (organ it lies in, other words that name it).
FINDINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "brain edema": ("brain", ("edema", "cerebral edema")),
    "brain enhancing tumor": ("brain", ("enhancing tumor", "brain tumor")),
    "brain non-enhancing tumor": ("brain", ("non-enhancing tumor", "brain tumor")),
    "liver cancer": ("liver", ("liver tumor",)),
    "lung cancer": ("lung", ("lung tumor",)),
    "cardiomegaly": ("heart", ()),
    "atelectasis": ("lung", ()),
    "pneumonia": ("lung", ()),
    "nodule": ("lung", ("pulmonary nodule",)),
    "mass": ("lung", ()),
    "effusion": ("lung", ("pleural effusion",)),
    "pneumothorax": ("lung", ()),
    "infiltrate": ("lung", ("infiltration", "pulmonary infiltration")),
}
# Words that make a question about an abnormality (matched as whole words, plurals too).
ABNORMALITY_WORDS = ("abnormal", "abnormality", "normal", "healthy", "disease", "lesion", "tumor", "cancer")
TYPOS = {"brian": "brain", "teeth": "tooth"}  # SLAKE's own misspelling; an irregular plural
KG_DISEASE_RELATIONS = ("cause", "treat", "symptom", "prevent")
# SLAKE knowledge-graph tails (``triple[2]``) -> the organs (ORGANS keys) that are that
# system or do that; used for "Does the picture contain the organ which ...?" when the answer
# is not "No". Tails SLAKE's own answers do not settle (``secrete enzymes``: the pancreas has
# no box; ``perceive things``) are left out: such rows get no box.
KG_TAIL_ORGANS: dict[str, tuple[str, ...]] = {
    "respiratory system": ("lung", "trachea", "larynx"),
    "circulatory system": ("heart",),
    "digestive system": (
        "esophagus",
        "stomach",
        "duodenum",
        "small bowel",
        "colon",
        "rectum",
        "liver",
        "parotid",
        "tooth",
    ),
    "nervous system": ("brain", "brain stem", "spinal cord", "temporal lobe"),
    "urinary system": ("kidney", "bladder"),
    "lymphatic system": ("spleen",),
    "sensory organs": ("eye", "ear"),
    "breathe": ("lung",),
    "gas delivery": ("trachea", "larynx"),
    "promote blood flow": ("heart",),
    "detoxicate": ("liver",),
    "store urine": ("bladder",),
    "excrete feces": ("rectum", "colon"),
    "sense light": ("eye",),
    "receive sound": ("ear",),
    "control heartbeat and breathing": ("brain stem",),
    "digest food": ("stomach", "duodenum", "small bowel"),
    "absorb nutrients": ("duodenum", "small bowel"),
    "deliver food": ("esophagus",),
    "adjust water and osmotic pressure balance": ("kidney",),
    "discharge waste": ("kidney", "bladder", "colon", "rectum"),
    "excrete body waste": ("kidney", "bladder", "colon", "rectum"),
}
SIDES = ("left", "right")


@dataclass(frozen=True)
class DetBox:
    """One ``detection.json`` entry.

    Attributes:
        label: SLAKE's label, e.g. ``"Left Kidney"``.
        box: ``(x1, y1, x2, y2)`` original-image pixels, or ``None`` when the entry is not
            4 finite numbers with ``w, h > 0`` (``problem`` says why).
    """

    label: str
    box: tuple[float, float, float, float] | None
    problem: str = ""


@dataclass(frozen=True)
class Selection:
    """Boxes a rule attaches: ``rule`` is the row's ``box_rule`` (``named``/``all``/``none``),
    ``how`` the step that chose them (``finding``, ``abnormality``, ``organ``, ``kg_tail``,
    ``label``, ``all``, ``no_evidence``, ``no_boxes``)."""

    boxes: tuple[DetBox, ...]
    rule: str
    how: str

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.boxes]


def parse_detection(items: Any, where: str = "") -> list[DetBox]:
    """Entries of a parsed SLAKE ``detection.json`` (a list of ``{label: [x, y, w, h]}``,
    absolute pixels of ``source.jpg``) as :class:`DetBox` with ``[x1, y1, x2, y2]`` boxes.

    A bad entry (not 4 finite numbers, ``w`` or ``h`` not positive) is kept with
    ``box=None``, so that only rows whose boxes need it are skipped.

    Raises:
        ValueError: the structure is not a list of objects.
    """
    if not isinstance(items, list):
        raise ValueError(f"{where}: top level is {type(items).__name__}, expected a list")
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise ValueError(f"{where}: entry {it!r} is not an object")
        for label, xywh in it.items():
            if not (isinstance(xywh, list) and len(xywh) == 4 and all(_is_number(v) for v in xywh)):
                out.append(DetBox(str(label), None, f"{label}: {xywh!r} is not [x, y, w, h]"))
                continue
            x, y, w, h = (float(v) for v in xywh)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                out.append(DetBox(str(label), None, f"{label}: {xywh!r} not finite or not positive size"))
                continue
            out.append(DetBox(str(label), (x, y, x + w, y + h)))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- matching -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entity:
    name: str  # base label, lower case
    kind: str  # "organ" | "finding"
    organ: str  # the organ a finding lies in (an organ's own name)


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _build() -> tuple[dict[tuple[str, ...], list[_Entity]], dict[str, _Entity], set[str]]:
    terms: dict[tuple[str, ...], list[_Entity]] = {}
    entities: dict[str, _Entity] = {}
    for name, extra in ORGANS.items():
        entities[name] = _Entity(name, "organ", name)
        for t in (name, *extra):
            terms.setdefault(tuple(_tokens(t)), []).append(entities[name])
    for name, (organ, extra) in FINDINGS.items():
        entities[name] = _Entity(name, "finding", organ)
        for t in (name, *extra):
            terms.setdefault(tuple(_tokens(t)), []).append(entities[name])
    vocab = {tok for t in terms for tok in t} | set(ABNORMALITY_WORDS)
    return terms, entities, vocab


_TERMS, _ENTITIES, _VOCAB = _build()
_MAX_TERM = max(len(t) for t in _TERMS)


def _singular(tok: str) -> str:
    tok = TYPOS.get(tok, tok)
    if tok in _VOCAB:
        return tok
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if tok.endswith(suffix) and tok[: -len(suffix)] + repl in _VOCAB:
            return tok[: -len(suffix)] + repl
    return tok


@dataclass(frozen=True)
class _Mention:
    entity: _Entity
    side: str  # "left", "right" or "" (no side named: both)


def mentions(text: str) -> tuple[list[_Mention], bool]:
    """Organs and findings a text names (longest term first, so ``lung cancer`` is not also
    ``lung``), each with the side written before it (``left lower lung`` -> left), and
    whether it uses an :data:`ABNORMALITY_WORDS` word."""
    toks = [_singular(t) for t in _tokens(text)]
    found, abnormal, i = [], False, 0
    while i < len(toks):
        for n in range(min(_MAX_TERM, len(toks) - i), 0, -1):
            ents = _TERMS.get(tuple(toks[i : i + n]))
            if ents:
                side = ""
                before = toks[max(0, i - 2) : i]
                if before and before[-1] in SIDES:
                    side = before[-1]
                elif len(before) == 2 and before[0] in SIDES and before[1] in ("upper", "lower", "middle"):
                    side = before[0]
                found += [_Mention(e, side) for e in ents]
                i += n
                break
        else:
            abnormal |= toks[i] in ABNORMALITY_WORDS
            i += 1
    return found, abnormal


def _label_entity(label: str) -> tuple[_Entity | None, str]:
    """Entity and side (``left``/``right``/``""``) of a SLAKE label; ``None`` when the label
    is not in the table (then only its whole text names it)."""
    low = " ".join(label.lower().split())
    side = ""
    first, _, rest = low.partition(" ")
    if first in SIDES and rest:
        side, low = first, rest
    return _ENTITIES.get(low), side


def _names(m: _Mention, label_entity: _Entity, label_side: str) -> bool:
    return m.entity is label_entity and (not m.side or not label_side or m.side == label_side)


def select_evidence(
    question: str,
    answer: str,
    dets: Sequence[DetBox],
    content_type: str = "",
    triple: Sequence[Any] | None = None,
) -> Selection:
    """The boxes that are the evidence for a question (see the module docstring for the steps).

    Args:
        question, answer: the record's text (English; other languages match nothing).
        dets: the image's boxes, original-image pixels.
        content_type, triple: SLAKE's fields (an abnormality question; the knowledge tail).

    Returns:
        :class:`Selection` with rule ``named`` (boxes attached) or ``none``.
    """
    if not dets:
        return Selection((), "none", "no_boxes")
    (found_q, abnormal), (found_a, _) = mentions(question), mentions(answer)  # apart: no side across them
    found = found_q + found_a
    rel = str(triple[1]).strip().lower() if isinstance(triple, (list, tuple)) and len(triple) == 3 else ""
    abnormal |= str(content_type).strip().lower() == "abnormality" or rel in KG_DISEASE_RELATIONS
    labelled = [(d, *_label_entity(d.label)) for d in dets]
    text_low = " ".join(_tokens(f"{question} {answer}"))

    def pick(pred) -> tuple[DetBox, ...]:
        return tuple(d for d, ent, side in labelled if pred(d, ent, side))

    named_findings = [m for m in found if m.entity.kind == "finding"]
    chosen = pick(
        lambda d, ent, side: (
            ent is not None and ent.kind == "finding" and any(_names(m, ent, side) for m in named_findings)
        )
    )
    if chosen:
        return Selection(chosen, "named", "finding")
    # a finding the question names but the image lacks ("Can pneumonia be observed...? No"):
    # other findings are not its evidence; one only the answer names does not block this step
    if abnormal and not any(m.entity.kind == "finding" for m in found_q):
        organs = {m.entity.organ for m in found if m.entity.kind == "organ"}
        chosen = pick(
            lambda d, ent, side: ent is not None and ent.kind == "finding" and (not organs or ent.organ in organs)
        )
        if chosen:
            return Selection(chosen, "named", "abnormality")
    named_organs = [m for m in found if m.entity.kind == "organ"]
    chosen = pick(
        lambda d, ent, side: ent is not None and ent.kind == "organ" and any(_names(m, ent, side) for m in named_organs)
    )
    if chosen:
        return Selection(chosen, "named", "organ")
    tail = " ".join(_tokens(str(triple[2]))) if rel else ""
    if tail in KG_TAIL_ORGANS and _tokens(answer)[:1] != ["no"]:
        kg = set(KG_TAIL_ORGANS[tail])
        chosen = pick(lambda d, ent, side: ent is not None and ent.kind == "organ" and ent.name in kg)
        if chosen:
            return Selection(chosen, "named", "kg_tail")
    # a label outside the table: its whole text, as the legacy rule matches it
    chosen = pick(
        lambda d, ent, side: ent is None and re.search(rf"\b{re.escape(' '.join(_tokens(d.label)))}\b", text_low)
    )
    if chosen:
        return Selection(chosen, "named", "label")
    return Selection((), "none", "no_evidence")


def select_legacy(question: str, answer: str, dets: Sequence[DetBox]) -> Selection:
    """The former rule: boxes whose whole label occurs in the question or answer, else all."""
    if not dets:
        return Selection((), "none", "no_boxes")
    text = f"{question} {answer}".lower()
    named = tuple(d for d in dets if re.search(rf"\b{re.escape(d.label.lower())}\b", text))
    return Selection(named, "named", "label") if named else Selection(tuple(dets), "all", "all")


def select_boxes(
    rule: str, question: str, answer: str, dets: Sequence[DetBox], record: dict[str, Any] | None = None
) -> Selection:
    """Dispatch on ``rule`` (:data:`BOX_RULE_CHOICES`); ``record`` gives SLAKE's fields.

    Raises:
        ValueError: unknown rule.
    """
    rec = record or {}
    if rule == "evidence":
        return select_evidence(question, answer, dets, rec.get("content_type", ""), rec.get("triple"))
    if rule == "legacy":
        return select_legacy(question, answer, dets)
    raise ValueError(f"box rule must be one of {BOX_RULE_CHOICES}, got {rule!r}")
