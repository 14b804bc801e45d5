"""The report's plots against the mean keep ratio: ``accuracy_vs_keep.png`` and ``time_vs_keep.png``
(matplotlib, no display needed), from a summary (:func:`vitos_verl.eval.report_summary.summarize`).

Part of the evaluation report (:mod:`vitos_verl.eval.report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitos_verl.eval.report_summary import method_key


def plot_vs_keep(summary: Mapping[str, Any], path: Path, ykey: str) -> Path:
    """Per model a panel (per protocol a row for accuracy): x mean keep ratio, y ``ykey``, a series per method.

    Large markers are the row's average over benchmarks, small faded ones its benchmarks.
    """
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in summary["rows"]})
    methods = sorted({r["method"] for r in summary["rows"]}, key=method_key)
    prot_rows = list(summary["protocols"]) if ykey == "accuracy" else [None]
    fig = Figure(figsize=(4.2 * max(len(models), 1) + 1.8, 3.4 * len(prot_rows)), layout="constrained")
    axes = fig.subplots(len(prot_rows), max(len(models), 1), squeeze=False)
    markers = "os^Dv<>pPX*h"
    palette = [f"C{i}" for i in range(10)]

    def y_of(stats: Mapping[str, Any], protocol: str | None) -> float | None:
        return stats["accuracy"][protocol] if protocol else stats["time_per_question_s"]

    for i, protocol in enumerate(prot_rows):
        for j, model in enumerate(models or [""]):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                row = next((r for r in summary["rows"] if r["model"] == model and r["method"] == method), None)
                if row is None:
                    continue
                style = {"marker": markers[k % len(markers)], "color": palette[k % len(palette)]}
                pts = [(c["keep_ratio"], y_of(c, protocol)) for c in row["per_benchmark"].values()]
                pts = [(x, y) for x, y in pts if x is not None and y is not None]
                if pts:
                    ax.scatter(*zip(*pts), s=14, alpha=0.35, linewidths=0, **style)
                x, y = row["average"]["keep_ratio"], y_of(row["average"], protocol)
                if x is not None and y is not None:
                    ax.scatter([x], [y], s=70, edgecolors="black", label=method, **style)
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("mean keep ratio (kept / all visual tokens)")
            ax.set_ylabel(f"accuracy, {protocol} (%)" if protocol else "time per question (s)")
            ax.set_title(model if not protocol else f"{model} ({protocol})", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("large markers: mean over the row's benchmarks; small faded markers: one benchmark each",
                 fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
