"""Did a run learn? Each stream's reward at the start and end of training, validation before and
after, and the targets of the learning check, from the run's metrics files.

Read as :mod:`vitos_verl.eval.summary` reads them (every ``metrics-*.jsonl`` of the run folder).
Per stream and per reward key (``<stream>/reward/{score,iou,acc,format,keep_ratio}``, the means
over a step's samples): the mean over the first ``window`` training steps and over the last
``window``, and the *step noise*: the standard deviation of the per-step values around their
window's mean, pooled over both windows (how much one step's mean moves when nothing changes).
A stream *rises* when ``last - first > 2 * step_noise``.

Validation (two-pass, greedy, one box and one answer per question; ``trainer.val_before_train``
gives the step-0 point): ``val/acc`` and the gt-box rows' IoU (the mean of ``val/<data_source>/iou``
over the data sources that have boxes) at the first and the last validation.

Targets (:func:`check`): validation accuracy and IoU each at least ``min_gain`` (0.20) above the
first validation, both streams rise, and, given a control run (``vitos.shuffle_rewards``: the
same run with each step's rewards permuted), neither of the control's streams rises.

CLI (``make learn`` runs it; its last line is the summary)::

    python -m vitos_verl.eval.learn_report outputs/runs/learn_cpu --control outputs/runs/learn_cpu_control
    ...
    learn: val_acc=0.30->0.62 val_iou=0.41->0.83 grounding_reward=1.10->1.71 reasoning_reward=0.71->1.05
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitos_verl.atomic import atomic_write_text
from vitos_verl.eval.curve import plot_curves, series
from vitos_verl.eval.summary import load
from vitos_verl.records import STREAMS

KEYS = ("score", "iou", "acc", "format", "keep_ratio")


def window_stats(values: Sequence[float], window: int) -> dict[str, float]:
    """``first``, ``last`` (means of the first / last ``window`` values), ``rise`` (last - first),
    ``step_noise`` (pooled std around each window's mean) and ``rises`` (1.0 when ``rise > 2 *
    step_noise``, else 0.0). NaN values are skipped.

    Raises:
        ValueError: fewer than ``2 * window`` values (the windows would overlap) or ``window < 2``.

    >>> s = window_stats([0, 1, 0, 1, 2, 3, 2, 3], 4)
    >>> s["first"], s["last"], s["rise"], s["rises"]
    (0.5, 2.5, 2.0, 1.0)
    """
    v = np.asarray([x for x in values if not math.isnan(float(x))], dtype=np.float64)
    if window < 2 or len(v) < 2 * window:
        raise ValueError(f"{len(v)} steps: need at least 2 * window = {2 * window} (window >= 2)")
    a, b = v[:window], v[-window:]
    noise = float(np.sqrt((((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()) / (2 * window - 2)))
    rise = float(b.mean() - a.mean())
    return {"first": float(a.mean()), "last": float(b.mean()), "rise": rise, "step_noise": noise,
            "rises": float(rise > 2 * noise)}  # fmt: skip


def _val_iou(m: Mapping[str, float]) -> float | None:
    ious = [v for k, v in m.items() if k.startswith("val/") and k.endswith("/iou") and k.count("/") == 2]
    return float(np.mean(ious)) if ious else None


def summarize(run_dir: str | Path, window: int = 10) -> dict[str, Any]:
    """The learning summary of one run folder (see module doc).

    Returns:
        ``{"run", "steps", "window", "streams": {stream: {key: window_stats}}, "val": {"steps",
        "acc", "iou"}}``, where ``val.acc`` / ``val.iou`` are ``[first, last]`` (None when absent).

    A run shorter than ``2 * window`` steps gets the largest window that fits (``window`` in the
    result says which).

    Raises:
        FileNotFoundError: no metrics in ``run_dir``.
        ValueError: fewer than 4 training steps.
    """
    steps = load(run_dir)
    train = {s: m for s, m in steps.items() if "grounding/reward/score" in m}
    window = min(window, len(train) // 2)
    out: dict[str, Any] = {"run": str(run_dir), "steps": len(train), "window": window, "streams": {}}
    for stream in STREAMS:
        out["streams"][stream] = {}
        for key in KEYS:
            _, y = series(train, f"{stream}/reward/{key}")
            if len(y):
                out["streams"][stream][key] = window_stats(y, window)
    vals = sorted(s for s, m in steps.items() if "val/acc" in m)
    out["val"] = {"steps": [vals[0], vals[-1]] if vals else [], "acc": [None, None], "iou": [None, None]}
    if vals:
        first, last = steps[vals[0]], steps[vals[-1]]
        out["val"]["acc"] = [float(first["val/acc"]), float(last["val/acc"])]
        out["val"]["iou"] = [_val_iou(first), _val_iou(last)]
        out["val"]["rows"] = first.get("val/rows")
    return out


def check(run: Mapping[str, Any], control: Mapping[str, Any] | None = None, min_gain: float = 0.20) -> dict[str, bool]:
    """The targets of a learning run (module doc); ``{target: met}``. A missing value fails."""

    def gain(key: str) -> float:
        a, b = run["val"][key]
        return -math.inf if a is None or b is None else b - a

    met = {
        f"val_acc_gain>={min_gain}": gain("acc") >= min_gain,
        f"val_iou_gain>={min_gain}": gain("iou") >= min_gain,
    }
    for stream in STREAMS:
        s = run["streams"][stream].get("score")
        met[f"{stream}_reward_rises"] = bool(s and s["rises"])
    if control is not None:
        for stream in STREAMS:
            s = control["streams"][stream].get("score")
            met[f"control_{stream}_reward_flat"] = bool(s and not s["rises"])
    return met


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summary_line(run: Mapping[str, Any]) -> str:
    """``learn: val_acc=a->b val_iou=a->b grounding_reward=first->last reasoning_reward=first->last``."""
    (a0, a1), (i0, i1) = run["val"]["acc"] or (None, None), run["val"]["iou"] or (None, None)
    g, r = run["streams"]["grounding"]["score"], run["streams"]["reasoning"]["score"]
    return (
        f"learn: val_acc={_f(a0)}->{_f(a1)} val_iou={_f(i0)}->{_f(i1)} "
        f"grounding_reward={_f(g['first'])}->{_f(g['last'])} reasoning_reward={_f(r['first'])}->{_f(r['last'])}"
    )


def markdown(run: Mapping[str, Any], met: Mapping[str, bool], control: Mapping[str, Any] | None = None) -> str:
    """The report as a markdown page: the per-stream window table, validation, the targets."""
    w = run["window"]
    lines = [f"# Learning report: `{Path(run['run']).name}`", "",
             f"{run['steps']} training steps; means over the first and last {w} steps; "
             "step noise = pooled std of the per-step means around each window's mean.", "",
             f"| stream | metric | first {w} | last {w} | rise | step noise | rises (> 2 noise) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in (("", run), ("control ", control)):
        if r is None:
            continue
        for stream in STREAMS:
            for key, s in r["streams"][stream].items():
                if stream == "reasoning" and key == "iou":
                    continue
                lines.append(f"| {label}{stream} | {key} | {s['first']:.3f} | {s['last']:.3f} | {s['rise']:+.3f} | "
                             f"{s['step_noise']:.3f} | {'yes' if s['rises'] else 'no'} |")  # fmt: skip
    v = run["val"]
    lines += ["", f"Validation (two-pass, greedy, {int(v['rows']) if v.get('rows') else '?'} questions) at steps {v['steps']}: "
              f"accuracy {_f(v['acc'][0])} -> {_f(v['acc'][1])}, IoU {_f(v['iou'][0])} -> {_f(v['iou'][1])}.", "",
              "| target | met |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {'yes' if ok else '**no**'} |" for k, ok in met.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.learn_report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the run folder (metrics-*.jsonl)")
    p.add_argument("--control", type=Path, help="the control run's folder (vitos.shuffle_rewards=true)")
    p.add_argument("--window", type=int, default=10, help="steps in the first and last windows")
    p.add_argument("--min-gain", type=float, default=0.20, help="validation gain target (accuracy and IoU)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    run = summarize(a.run_dir, a.window)
    control = summarize(a.control, a.window) if a.control else None
    met = check(run, control, a.min_gain)
    report = {"run": run, "control": control, "targets": met, "summary": summary_line(run)}
    atomic_write_text(a.run_dir / "learn_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(a.run_dir / "learn_report.md", markdown(run, met, control))
    plot_curves(load(a.run_dir), a.run_dir / "learn_curve.png", window=a.window, title=a.run_dir.name)
    print(markdown(run, met, control))
    print(f"report: {a.run_dir / 'learn_report.md'} {a.run_dir / 'learn_curve.png'}")
    print(report["summary"])
    return 1 if a.strict and not all(met.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
