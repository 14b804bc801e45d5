"""The numbers of the evaluation report: per (model, method) and benchmark, accuracy under each
protocol, keep ratio, tokens, time, speed-up, the average over benchmarks and relative performance.

:func:`summarize` turns prediction records (:mod:`vitos_verl.eval.report_predictions`) into the
summary that ``report.json`` holds and the tables (:mod:`vitos_verl.eval.report_markdown`), plots
(:mod:`vitos_verl.eval.report_plots`) and cards (:mod:`vitos_verl.eval.report_cards`) are drawn from;
the table's row and column order and the published reference scores live here too.

Units and formulas (per model, method and benchmark, over its ``n`` questions):

* accuracy: ``100 * (questions judged right) / (questions with a verdict)``, percent, under each
  protocol of :data:`vitos_verl.eval.protocols.PROTOCOLS` (``correct[protocol]`` of a record);
* keep ratio: mean of the records' ``keep_ratio`` (kept / all visual tokens; 1 for one pass);
* prompt tokens: mean ``prompt_tokens`` of the answering pass; grounding prompt tokens: mean
  ``grounding_prompt_tokens`` (0 for one-pass methods);
* each pass on its own: mean output tokens (``grounding_output_tokens``, ``answer_output_tokens``),
  mean seconds per question (``grounding_time_s``, ``answer_time_s``: each generate call's wall time
  shared equally by its questions), the mean batch of those calls (``grounding_batch``,
  ``answer_batch``) and the answering pass's throughput (questions and output tokens per second);
* time per question: ``sum(time_s) / n``, seconds (wall time of all passes of a question);
* speed-up: ``t_full / t_method``, the time per question of the same model's ``"full"`` method
  (one pass, nothing pruned) on the same benchmark over this method's;
* average: the unweighted mean over the benchmarks the row has (each benchmark counts once,
  whatever its size); the average speed-up is ``mean_b t_full(b) / mean_b t_method(b)`` over the
  benchmarks both have.

Relative performance of a row with accuracies ``a_b`` against a reference with accuracies
``r_b``, over the set ``B`` of benchmarks both have (and ``r_b > 0``), percent:

* mean of ratios: ``100 * (1/|B|) * sum_{b in B} a_b / r_b``;
* ratio of means: ``100 * (sum_{b in B} a_b / |B|) / (sum_{b in B} r_b / |B|)``.

E.g. ``a = (50, 80)``, ``r = (40, 100)``: mean of ratios ``(1.25 + 0.8) / 2 = 102.5 %``, ratio of
means ``65 / 70 = 92.86 %``. The reference is the same model's ``"full"`` method by default, or
one ``(model, method)`` for every row, or a published table (:data:`PUBLISHED`, compared under
the ``medevalkit`` protocol only).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vitos_verl.eval.protocols import DATASETS, PROTOCOLS

# MedEvalKit scores (percent) of Lingshu-7B from the Lingshu technical report (its table of
# medical VQA results, rule-based MedEvalKit evaluation). Only comparable with this project's
# ``medevalkit`` protocol; the ``strict`` protocol has no published counterpart.
PUBLISHED: dict[str, dict[str, float]] = {
    "Lingshu-7B": {
        "mmmu_med": 54.0,
        "vqa_rad": 67.9,
        "slake": 83.1,
        "pathvqa": 61.9,
        "pmc_vqa": 56.3,
        "omnimedvqa": 82.9,
        "medxpertqa_mm": 26.7,
    }
}
PUBLISHED_PROTOCOL = "medevalkit"

# the column order of the tables: the seven benchmarks of vitos_verl.eval.protocols.DATASETS
TABLE_BENCHMARKS: tuple[str, ...] = tuple(DATASETS)
FULL = "full"
# row order of the tables: one pass, ViToS, then the baselines; unknown methods after, sorted
METHOD_ORDER = ("full", "vitos", "random", "center", "crop", "oracle", "fastv")


def number(v: Any) -> float | None:
    """``v`` as a finite float, else None (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(values: Iterable[Any]) -> float | None:
    vals = [x for x in (number(v) for v in values) if x is not None]
    return sum(vals) / len(vals) if vals else None


def benchmark_order(benchmarks: Iterable[str]) -> list[str]:
    """The benchmarks given, in :data:`TABLE_BENCHMARKS` order, unknown ones after (sorted)."""
    present = set(benchmarks)
    return [b for b in TABLE_BENCHMARKS if b in present] + sorted(present - set(TABLE_BENCHMARKS))


def method_key(method: str) -> tuple[int, str]:
    """Sort key of a method: :data:`METHOD_ORDER` first, in that order, then unknown methods by name."""
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _cell(records: Sequence[dict]) -> dict[str, Any]:
    """Statistics of one (model, method, benchmark); see the module docstring for units."""
    n = len(records)
    correct, scored, accuracy = {}, {}, {}
    for p in PROTOCOLS:
        verdicts = [(r.get("correct") or {}).get(p) for r in records if isinstance(r.get("correct"), dict)]
        verdicts = [v for v in verdicts if isinstance(v, bool)]
        scored[p], correct[p] = len(verdicts), sum(verdicts)
        accuracy[p] = 100.0 * correct[p] / scored[p] if scored[p] else None
    times = [x for x in (number(r.get("time_s")) for r in records) if x is not None]
    answer_t = [x for x in (number(r.get("answer_time_s")) for r in records) if x is not None]
    answer_out = [x for x in (number(r.get("answer_output_tokens")) for r in records) if x is not None]
    ious = [x for x in (number(r.get("iou")) for r in records) if x is not None]
    return {
        "n": n,
        "n_scored": scored,
        "correct": correct,
        "accuracy": accuracy,
        "keep_ratio": _mean(r.get("keep_ratio") for r in records),
        "visual_tokens": _mean(r.get("visual_tokens") for r in records),
        "kept_tokens": _mean(r.get("kept_tokens") for r in records),
        "prompt_tokens": _mean(r.get("prompt_tokens") for r in records),
        "grounding_prompt_tokens": _mean(r.get("grounding_prompt_tokens") for r in records),
        "output_tokens": _mean(r.get("output_tokens") for r in records),
        # each pass on its own (where a ratio comes from: prefill, decoding or shorter answers)
        "grounding_output_tokens": _mean(r.get("grounding_output_tokens") for r in records),
        "answer_output_tokens": _mean(answer_out) if answer_out else None,
        "grounding_time_s": _mean(r.get("grounding_time_s") for r in records),
        "answer_time_s": _mean(answer_t) if answer_t else None,
        "answer_batch": _mean(r.get("answer_batch") for r in records),
        "grounding_batch": _mean(r.get("grounding_batch") for r in records),
        # answering pass: questions and output tokens per second of its generate calls
        "answer_questions_per_s": len(answer_t) / sum(answer_t) if answer_t and sum(answer_t) > 0 else None,
        "answer_tokens_per_s": (sum(answer_out) / sum(answer_t)
                                if answer_out and len(answer_out) == len(answer_t) and sum(answer_t) > 0 else None),
        "time_total_s": sum(times),
        "n_timed": len(times),
        "time_per_question_s": sum(times) / n if times and n else None,
        "speedup": None,  # filled in by summarize (needs the "full" cell)
        "iou": sum(ious) / len(ious) if ious else None,
        "n_iou": len(ious),
        # a grounding pass ran but gave no usable box (the answering pass then saw everything)
        "n_no_box": sum(1 for r in records if r.get("grounding_output") is not None and r.get("box_resized") is None),
        # the runner's "error" (a request refused, e.g. a prompt too long; the verdicts are then False)
        "n_errors": sum(1 for r in records if r.get("error")),
    }


def _parse_reference(reference: Any) -> dict[str, Any]:
    """Normalise ``reference``; see :func:`summarize`."""
    if reference is None or reference == FULL or reference == ("", FULL):
        return {"kind": "full", "description": f"the same model's '{FULL}' method (one pass, no pruning)"}
    if isinstance(reference, Mapping):
        return {"kind": "table", "name": "given table", "scores": dict(reference), "protocols": list(PROTOCOLS),
                "description": "a given table of accuracies"}
    if isinstance(reference, str):
        if reference.startswith("published:"):
            name = reference.split(":", 1)[1]
            if name not in PUBLISHED:
                raise ValueError(f"no published table {name!r}; known: {sorted(PUBLISHED)}")
            return {"kind": "table", "name": name, "scores": dict(PUBLISHED[name]), "protocols": [PUBLISHED_PROTOCOL],
                    "description": f"published {PUBLISHED_PROTOCOL} scores of {name} (Lingshu report)"}
        if ":" not in reference:
            raise ValueError(f"reference must be 'MODEL:METHOD', 'published:NAME' or 'full', got {reference!r}")
        model, method = reference.rsplit(":", 1)
        reference = (model, method)
    model, method = (str(v) for v in reference)
    return {"kind": "method", "model": model, "method": method, "description": f"{model} / {method}"}


def _relative(acc: Mapping[str, float | None], ref: Mapping[str, float | None]) -> dict[str, Any]:
    """Both forms of relative performance (percent) over the benchmarks both have (ref > 0)."""
    common = [b for b in benchmark_order(set(acc) & set(ref)) if acc.get(b) is not None and ref.get(b) is not None]
    used = [b for b in common if ref[b] > 0]
    out: dict[str, Any] = {"benchmarks": used, "excluded_zero_reference": [b for b in common if ref[b] <= 0]}
    if not used:
        out.update(mean_of_ratios=None, ratio_of_means=None)
        return out
    out["mean_of_ratios"] = 100.0 * sum(acc[b] / ref[b] for b in used) / len(used)
    out["ratio_of_means"] = 100.0 * (sum(acc[b] for b in used) / len(used)) / (sum(ref[b] for b in used) / len(used))
    return out


def summarize(records: Sequence[dict], reference: Any = None) -> dict[str, Any]:
    """Per (model, method): per-benchmark cells, the average over benchmarks, relative performance.

    Args:
        records: prediction records (:func:`load_predictions`); a :class:`Predictions`'
            ``report`` is copied into the summary's ``"load"``.
        reference: what relative performance compares against:

            * ``None`` or ``"full"``: the same model's ``"full"`` method;
            * ``(model, method)`` or ``"MODEL:METHOD"``: that row, for every row;
            * ``"published:NAME"``: :data:`PUBLISHED` ``[NAME]`` (``medevalkit`` protocol only;
              ``None`` under the others);
            * a mapping ``{benchmark: accuracy percent}``: that table, under every protocol.

    Returns:
        JSON-serialisable ``dict``: ``protocols``, ``benchmarks`` (present, table order),
        ``reference`` (how it was read), ``rows`` (one per (model, method) in table order, each
        with ``per_benchmark`` ``{benchmark: cell}``, ``average`` and ``relative``
        ``{protocol: {mean_of_ratios, ratio_of_means, benchmarks, ...}}``), ``load``. Accuracies
        and relative performance in percent, times in seconds, tokens per question.

    Raises:
        ValueError: an unknown published table or a malformed reference string.
    """
    ref = _parse_reference(reference)
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(str(r.get("model", "")), str(r.get("method", "")))][str(r.get("benchmark", ""))].append(r)
    benchmarks = benchmark_order({b for g in groups.values() for b in g})
    cells = {key: {b: _cell(recs) for b, recs in g.items()} for key, g in groups.items()}
    # speed-up against the same model's one pass, per benchmark
    for (model, _method), per in cells.items():
        full = cells.get((model, FULL), {})
        for b, c in per.items():
            t_full = full.get(b, {}).get("time_per_question_s")
            t = c["time_per_question_s"]
            c["speedup"] = t_full / t if t_full is not None and t else None

    def average(model: str, method: str) -> dict[str, Any]:
        per = cells[(model, method)]
        bs = [b for b in benchmarks if b in per]
        avg: dict[str, Any] = {"benchmarks": bs, "n": sum(per[b]["n"] for b in bs)}
        avg["accuracy"] = {p: _mean(per[b]["accuracy"][p] for b in bs) for p in PROTOCOLS}
        avg["accuracy_benchmarks"] = {p: [b for b in bs if per[b]["accuracy"][p] is not None] for p in PROTOCOLS}
        for k in ("keep_ratio", "visual_tokens", "kept_tokens", "prompt_tokens", "grounding_prompt_tokens",
                  "output_tokens", "time_per_question_s", "iou", "grounding_output_tokens", "answer_output_tokens",
                  "grounding_time_s", "answer_time_s", "answer_batch", "grounding_batch",
                  "answer_questions_per_s", "answer_tokens_per_s"):
            avg[k] = _mean(per[b][k] for b in bs)
        full = cells.get((model, FULL), {})
        both = [b for b in bs if b in full and per[b]["time_per_question_s"] and
                full[b]["time_per_question_s"] is not None]
        t = _mean(per[b]["time_per_question_s"] for b in both)
        t_full = _mean(full[b]["time_per_question_s"] for b in both)
        avg["speedup"] = t_full / t if both and t else None
        avg["speedup_benchmarks"] = both
        return avg

    averages = {key: average(*key) for key in cells}

    def ref_scores(model: str, protocol: str) -> tuple[dict[str, float | None] | None, str]:
        if ref["kind"] == "table":
            if protocol not in ref["protocols"]:
                return None, f"{ref['name']} has published scores under {', '.join(ref['protocols'])} only"
            return {b: number(v) for b, v in ref["scores"].items()}, ref["name"]
        key = (model, FULL) if ref["kind"] == "full" else (ref["model"], ref["method"])
        if key not in cells:
            return None, f"no predictions of {key[0]} / {key[1]}"
        return {b: c["accuracy"][protocol] for b, c in cells[key].items()}, f"{key[0]} / {key[1]}"

    rows = []
    for model, method in sorted(cells, key=lambda k: (method_key(k[1]), k[0])):
        per = cells[(model, method)]
        relative = {}
        for p in PROTOCOLS:
            scores, against = ref_scores(model, p)
            if scores is None:
                relative[p] = {"mean_of_ratios": None, "ratio_of_means": None, "benchmarks": [], "against": None,
                               "note": against}
                continue
            rel = _relative({b: c["accuracy"][p] for b, c in per.items()}, scores)
            rel["against"] = against
            relative[p] = rel
        rows.append({
            "model": model,
            "method": method,
            "per_benchmark": {b: per[b] for b in benchmarks if b in per},
            "average": averages[(model, method)],
            "relative": relative,
        })
    load = getattr(records, "report", None)
    return {
        "protocols": list(PROTOCOLS),
        "benchmarks": benchmarks,
        "reference": {k: v for k, v in ref.items() if k != "scores"} | (
            {"scores": ref["scores"]} if ref["kind"] == "table" else {}),
        "rows": rows,
        "load": load,
    }
