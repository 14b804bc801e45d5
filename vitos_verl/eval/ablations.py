"""The ablation table of ``make learn-ablations`` (scripts/learn_ablations.sh): one row per
trained variant, from its run's learning report and the evaluation harness's predictions.

    python -m vitos_verl.eval.ablations --eval OUT/ablations/seed0/eval --out OUT/ablations/seed0 \
        vitos=OUT/runs/learn_cpu-seed0 no_feedback=OUT/runs/learn_abl-no_feedback-seed0 ...

Per variant (the evaluation's model tag is the variant's name):

* from the run (:func:`vitos_verl.eval.learn_report.summarize`): the trainer's two-pass greedy
  validation accuracy and IoU before training and at the end (fractions), and each stream's
  reward over the first and last 10 steps;
* from the evaluation (:func:`vitos_verl.eval.report_summary.summarize` of the records under
  ``--eval``): accuracy in percent under the ``strict`` protocol (the controlled task has no
  MedEvalKit rule) of each method: ``full`` (one pass), ``vitos`` (ground, prune, reason),
  ``crop`` (ground, crop, reason), ``oracle`` (the ground-truth box), ``random`` (random cells at
  ViToS's keep ratio per question); ViToS's mean keep ratio and mean IoU of its boxes.

Writes ``ablations.json``, ``ablations.md`` and ``ablations.png`` (accuracy per method, grouped by
variant) under ``--out``. The paper's counterpart: its ablation table (no cross-feedback, joint
loss, no pruning, crop) on the medical benchmarks; this is the miniature on the controlled task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitos_verl.atomic import atomic_write_text
from vitos_verl.eval.learn_report import summarize as summarize_run
from vitos_verl.eval.report_predictions import load_predictions
from vitos_verl.eval.report_summary import summarize as summarize_eval

METHODS = ("full", "vitos", "crop", "oracle", "random")
PROTOCOL = "strict"
VARIANTS = {
    "vitos": "ViToS as configured (recipes/learn_cpu.yaml)",
    "no_feedback": "no cross-feedback (vitos.w_fb=0)",
    "joint": "one summed loss (vitos.order=joint)",
    "no_prune": "reasoning on the full image (vitos.prune_mode=none)",
    "crop": "reasoning on the crop (vitos.prune_mode=crop)",
}


def table(runs: Mapping[str, str | Path], eval_dir: str | Path) -> list[dict[str, Any]]:
    """One row per variant, in the order given.

    Args:
        runs: ``{variant: run folder}`` (each with the trainer's metrics and validation).
        eval_dir: the evaluation's ``out_dir`` (``predictions/<variant>/<benchmark>/<method>.jsonl``).

    Returns:
        ``[{variant, what, val_acc: [start, end], val_iou: [start, end], reward: {stream: [first10,
        last10]}, accuracy: {method: percent or None}, n: {method: questions}, keep_ratio, iou}]``;
        a variant or method with no records has ``None`` values (reported, never dropped).
    """
    summary = summarize_eval(load_predictions(eval_dir))
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for row in summary["rows"]:
        per = list(row["per_benchmark"].values())
        if len(per) == 1:
            cells[(row["model"], row["method"])] = per[0]
    rows = []
    for variant, run in runs.items():
        s = summarize_run(run)
        val = s["val"]
        rows.append({
            "variant": variant,
            "what": VARIANTS.get(variant, variant),
            "run": str(run),
            "val_acc": [val["acc"][0], val["acc"][-1]] if val["acc"] else [None, None],
            "val_iou": [val["iou"][0], val["iou"][-1]] if val["iou"] else [None, None],
            "reward": {k: [v["score"]["first"], v["score"]["last"]] for k, v in s["streams"].items()},
            "accuracy": {m: (cells.get((variant, m)) or {}).get("accuracy", {}).get(PROTOCOL) for m in METHODS},
            "n": {m: (cells.get((variant, m)) or {}).get("n", 0) for m in METHODS},
            "keep_ratio": (cells.get((variant, "vitos")) or {}).get("keep_ratio"),
            "iou": (cells.get((variant, "vitos")) or {}).get("iou"),
        })  # fmt: skip
    return rows


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as markdown (accuracy in percent, ``strict`` protocol; validation as fractions)."""
    head = ["Variant", "Trainer val acc", "Trainer val IoU", "Grounding reward", "Reasoning reward",
            *[f"Eval {m}" for m in METHODS], "ViToS keep ratio", "ViToS IoU"]  # fmt: skip
    lines = [
        "# Ablations in miniature (make learn-ablations)",
        "",
        "Trainer columns: two-pass greedy validation (start -> end, fractions) and each stream's sampled "
        "reward (mean of the first -> last 10 steps). Eval columns: the evaluation harness on the trained "
        f"policy, accuracy in percent under the `{PROTOCOL}` protocol: one pass on the full image, two-pass "
        "ViToS, two-pass crop, the ground-truth box, random cells at ViToS's keep ratio.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in rows:
        cols = [
            f"{r['variant']}: {r['what']}",
            f"{_f(r['val_acc'][0], '.2f')} -> {_f(r['val_acc'][1], '.2f')}",
            f"{_f(r['val_iou'][0], '.2f')} -> {_f(r['val_iou'][1], '.2f')}",
            *[f"{_f(r['reward'].get(s, [None])[0], '.2f')} -> {_f(r['reward'].get(s, [None, None])[1], '.2f')}"
              for s in ("grounding", "reasoning")],
            *[_f(r["accuracy"][m], ".1f") for m in METHODS],
            _f(r["keep_ratio"], ".3f"),
            _f(r["iou"], ".2f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cols) + " |")
    n = sorted({v for r in rows for v in r["n"].values()})
    lines += ["", f"Questions per evaluated cell: {n}."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars: evaluation accuracy (percent) per method, one group per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        ys = [r["accuracy"][m] if r["accuracy"][m] is not None else 0.0 for r in rows]
        ax.bar([i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(rows))], ys, width, label=m)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set_ylabel(f"accuracy, % ({PROTOCOL})")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=len(METHODS), loc="upper center")
    ax.set_title("ablations in miniature: evaluation of each trained policy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (module docstring); prints the markdown table. Exit 2 on a malformed ``variant=run``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", required=True, help="the evaluation's out_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+", help="variant=run_dir")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        variant, sep, run = item.partition("=")
        if not sep or not variant or not Path(run).is_dir():
            print(f"ablations: expected variant=run_dir with an existing folder, got {item!r}", file=sys.stderr)
            return 2
        runs[variant] = run
    rows = table(runs, args.eval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablations.json", json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    atomic_write_text(out / "ablations.md", md)
    plot(rows, out / "ablations.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
