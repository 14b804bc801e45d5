"""``report.md``: the paper's table per protocol, the formulas, questions per cell and load counts,
as GitHub markdown, from a summary (:func:`vitos_verl.eval.report_summary.summarize`); the
display names of benchmarks and methods and how numbers are written.

Part of the evaluation report (:mod:`vitos_verl.eval.report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitos_verl.eval.report_summary import TABLE_BENCHMARKS

BENCHMARK_NAMES = {
    "slake": "SLAKE",
    "vqa_rad": "VQA-RAD",
    "pathvqa": "PathVQA",
    "pmc_vqa": "PMC-VQA",
    "omnimedvqa": "OmniMedVQA",
    "mmmu_med": "MMMU-Med",
    "medxpertqa_mm": "MedXpertQA-MM",
}

METHOD_NAMES = {
    "full": "One pass (no pruning)",
    "vitos": "ViToS (ground, prune, reason)",
    "random": "Random cells",
    "center": "Centre cells",
    "crop": "Crop",
    "oracle": "Oracle box",
    "fastv": "FastV",
}


def fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
    """``v`` with ``digits`` decimals and ``suffix``; ``-`` for None (no value)."""
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def markdown_table(summary: Mapping[str, Any], protocol: str) -> str:
    """The paper's table for one protocol, as GitHub markdown.

    Rows: method x backbone (model). Columns: the seven benchmarks in :data:`TABLE_BENCHMARKS`
    order (accuracy percent, 1 decimal; ``-`` where the row has no predictions), then any other
    benchmark, the average over the row's benchmarks, relative performance (mean of ratios and
    ratio of means, percent), mean keep ratio, mean prompt tokens (answering pass) and grounding
    prompt tokens, latency (seconds per question, all passes) and speed-up against the same
    model's one pass. An average over fewer benchmarks than the table has is marked ``*``.
    """
    if protocol not in summary["protocols"]:
        raise ValueError(f"protocol must be one of {summary['protocols']}, got {protocol!r}")
    extra = [b for b in summary["benchmarks"] if b not in TABLE_BENCHMARKS]
    cols = list(TABLE_BENCHMARKS) + extra
    all_bs = set(summary["benchmarks"])
    head = (["Method", "Backbone"] + [BENCHMARK_NAMES.get(b, b) for b in cols]
            + ["Avg.", "Rel. (mean of ratios)", "Rel. (ratio of means)", "Keep ratio", "Prompt tok.",
               "Ground. prompt tok.", "Latency (s/q)", "Speed-up"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in summary["rows"]:
        per, avg, rel = row["per_benchmark"], row["average"], row["relative"][protocol]
        accs = [fmt(per[b]["accuracy"][protocol]) if b in per else "-" for b in cols]
        avg_acc = fmt(avg["accuracy"][protocol])
        if avg["accuracy"][protocol] is not None and set(avg["accuracy_benchmarks"][protocol]) != all_bs:
            avg_acc += "*"
        speed = avg["speedup"]
        cells = ([METHOD_NAMES.get(row["method"], row["method"]), row["model"]] + accs
                 + [avg_acc, fmt(rel["mean_of_ratios"], 1, "%"), fmt(rel["ratio_of_means"], 1, "%"),
                    fmt(avg["keep_ratio"], 3), fmt(avg["prompt_tokens"], 0), fmt(avg["grounding_prompt_tokens"], 0),
                    fmt(avg["time_per_question_s"], 3), "-" if speed is None else f"{speed:.2f}x"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def passes_table(summary: Mapping[str, Any]) -> str:
    """Where the time goes: per method x backbone (means over the row's benchmarks), the grounding
    pass's prompt tokens, output tokens, seconds per question and batch, then the answering pass's
    prompt tokens, kept visual tokens, output tokens, seconds per question, batch and throughput
    (questions and output tokens per second), and the latency of both passes."""
    head = ["Method", "Backbone", "Ground. prompt tok.", "Ground. output tok.", "Ground. s/q", "Ground. batch",
            "Answer prompt tok.", "Kept visual tok.", "Answer output tok.", "Answer s/q", "Answer batch",
            "Answer q/s", "Answer tok/s", "Latency (s/q)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in summary["rows"]:
        a = row["average"]
        two = (a.get("grounding_prompt_tokens") or 0) > 0  # a grounding pass ran
        cells = [METHOD_NAMES.get(row["method"], row["method"]), row["model"],
                 fmt(a.get("grounding_prompt_tokens"), 0) if two else "-",
                 fmt(a.get("grounding_output_tokens"), 1) if two else "-",
                 fmt(a.get("grounding_time_s"), 4) if two else "-", fmt(a.get("grounding_batch"), 0) if two else "-",
                 fmt(a.get("prompt_tokens"), 0), fmt(a.get("kept_tokens"), 0), fmt(a.get("answer_output_tokens"), 1),
                 fmt(a.get("answer_time_s"), 4), fmt(a.get("answer_batch"), 0), fmt(a.get("answer_questions_per_s"), 1),
                 fmt(a.get("answer_tokens_per_s"), 0), fmt(a.get("time_per_question_s"), 4)]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _n_table(summary: Mapping[str, Any]) -> str:
    cols = summary["benchmarks"]
    lines = ["| Method | Backbone | " + " | ".join(BENCHMARK_NAMES.get(b, b) for b in cols) + " | Total |",
             "|---|---|" + "---:|" * (len(cols) + 1)]
    for row in summary["rows"]:
        per = row["per_benchmark"]
        ns = [str(per[b]["n"]) if b in per else "-" for b in cols]
        lines.append(f"| {row['method']} | {row['model']} | " + " | ".join(ns) + f" | {row['average']['n']} |")
    return "\n".join(lines)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as ``(dotted.key, value)``."""
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return [(prefix, obj)]
    return []


def _load_section(load: Mapping[str, Any] | None) -> list[str]:
    if not load:
        return []
    out = ["## Predictions read", "",
           f"{load['records']} records from {load['files']} files ({load['lines']} non-blank lines) under "
           f"`{load['root']}`; malformed lines skipped: {load['bad_lines']}; duplicates replaced: "
           f"{load['duplicates']}; records whose fields disagree with their path: {load['path_mismatch']}."]
    if load["bad"]:
        out += [""] + [f"- `{b['file']}` line {b['line']}: {b['error']}" for b in load["bad"]]
        if load["bad_lines"] > len(load["bad"]):
            out.append(f"- ... and {load['bad_lines'] - len(load['bad'])} more")
    if load.get("load_reports"):
        out += ["", "### Benchmark loading (load_report.json: rows in/out, skipped rows by reason)", ""]
        for where, rep in sorted(load["load_reports"].items()):
            leaves = [(k, v) for k, v in _flatten(rep) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if isinstance(rep, Mapping) and "error" in rep:
                leaves.append(("error", rep["error"]))
            out.append(f"- `{where}`: " + (", ".join(f"{k} = {v}" for k, v in leaves) or "no counts"))
    return out


def _relative_note(summary: Mapping[str, Any], protocol: str) -> list[str]:
    """Which reference and benchmarks each row's relative performance used (one line if all agree)."""
    used = {}
    for row in summary["rows"]:
        rel = row["relative"][protocol]
        if rel.get("against"):
            what = f"against {rel['against']} over {', '.join(rel['benchmarks']) or 'no common benchmark'}"
        else:
            what = f"not computed: {rel.get('note', 'no reference')}"
        if rel.get("excluded_zero_reference"):
            what += f" (left out, reference accuracy 0: {', '.join(rel['excluded_zero_reference'])})"
        used[f"{row['method']} / {row['model']}"] = what
    if len(set(used.values())) == 1:
        return [f"Relative performance, every row: {next(iter(used.values()))}."]
    return ["Relative performance, per row:", ""] + [f"- {k}: {v}" for k, v in used.items()]


def render_markdown(summary: Mapping[str, Any], title: str = "ViToS evaluation") -> str:
    """The whole ``report.md``: a table per protocol, the formulas, n per cell, load counts."""
    out = [f"# {title}", "",
           f"Reference for relative performance: {summary['reference']['description']}.", "",
           "Accuracy in percent. Avg. = unweighted mean over the row's benchmarks (`*`: fewer than the table's). "
           "Rel. (mean of ratios) = 100 * mean_b(acc_b / ref_b); Rel. (ratio of means) = "
           "100 * mean_b(acc_b) / mean_b(ref_b), both over the benchmarks the row and its reference share. "
           "Keep ratio = kept / all visual tokens. Prompt tok. = answering-pass prompt tokens per question; "
           "Ground. prompt tok. = grounding-pass prompt tokens (0 for one pass). Latency = sum(time_s) / n, "
           "seconds per question over all passes. Speed-up = latency of the same model's one pass / this latency "
           "(averaged as mean latency over mean latency)."]
    for p in summary["protocols"]:
        out += ["", f"## Protocol: {p}", "", markdown_table(summary, p), ""] + _relative_note(summary, p)
    out += ["", "## Where the time goes (each pass)", "",
            "Means over the row's benchmarks. A pass's s/q is its generate calls' wall time shared equally by "
            "their questions (batch = questions per call); Answer q/s and tok/s = questions and output tokens "
            "per second of the answering pass. A ratio of latencies that follows the output tokens comes from "
            "decoding (shorter answers), one that follows the prompt tokens at equal outputs from prefill.", "",
            passes_table(summary)]
    out += ["", "## Questions per cell (n)", "", _n_table(summary)]
    extras = []
    for row in summary["rows"]:
        for b, c in row["per_benchmark"].items():
            unscored = {p: c["n"] - c["n_scored"][p] for p in summary["protocols"] if c["n"] - c["n_scored"][p]}
            if unscored:
                extras.append(f"- {row['method']} / {row['model']} / {b}: without a verdict: {unscored}")
            if c.get("n_errors"):
                extras.append(f"- {row['method']} / {row['model']} / {b}: {c['n_errors']} records with an error "
                              "(counted wrong)")
            if c["n_no_box"]:
                extras.append(f"- {row['method']} / {row['model']} / {b}: {c['n_no_box']} grounding outputs "
                              "without a usable box")
    if extras:
        out += ["", "Notes:", ""] + extras
    out += [""] + _load_section(summary.get("load"))
    return "\n".join(out).rstrip() + "\n"
