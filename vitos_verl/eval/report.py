"""The paper's tables, a JSON summary, two plots and a browsable HTML page from evaluation predictions.

Input: the evaluation runner's predictions (:mod:`vitos_verl.eval.runner`), one JSONL file per
(model, benchmark, method)::

    <root>/predictions/<model>/<benchmark>/<method>.jsonl      one JSON object per question
                                     (or <method>.shard<i>of<n>.jsonl: the shards are merged)
    <root>/predictions/<model>/<benchmark>/load_report.json    optional: rows in/out, skipped by reason
    <root>/data/<benchmark>/<split>.parquet                    the benchmark rows (images for the cards)

Output (``write_report``)::

    report.md             one table per protocol (paper layout), n per cell, load counts
    report.json           the summary (:func:`summarize`), full precision
    accuracy_vs_keep.png  accuracy (%) against mean keep ratio, per model, one series per method
    time_vs_keep.png      time per question (s) against mean keep ratio
    cards.html, img/      per-question cards for browsing errors

The parts, one module each (this module reads the predictions, calls them and writes the files):

* :mod:`vitos_verl.eval.report_predictions`: reading the predictions back (:func:`load_predictions`);
* :mod:`vitos_verl.eval.report_summary`: the numbers (:func:`summarize`: accuracy, keep ratio,
  tokens, time, speed-up, averages, relative performance; their units and formulas), the table's
  row and column order and the published reference scores (:data:`PUBLISHED`);
* :mod:`vitos_verl.eval.report_markdown`: ``report.md`` (:func:`markdown_table`, :func:`render_markdown`);
* :mod:`vitos_verl.eval.report_plots`: the two plots;
* :mod:`vitos_verl.eval.report_cards`: ``cards.html`` (:func:`write_cards`, :func:`render_thumbnail`),
  its pictures read from the benchmark parquet with :mod:`vitos_verl.data.parquet_rows`.

Every name above stays importable from here (``from vitos_verl.eval.report import summarize``).

CLI::

    python -m vitos_verl.eval.report outputs/eval [--out DIR] \
        [--reference MODEL:METHOD | --reference published:Lingshu-7B] [--cards N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitos_verl.eval.protocols import PROTOCOLS
from vitos_verl.eval.report_cards import DEFAULT_CARDS, GT_COLOUR, PRED_COLOUR, THUMB, render_thumbnail, write_cards
from vitos_verl.eval.report_markdown import BENCHMARK_NAMES, METHOD_NAMES, markdown_table, render_markdown
from vitos_verl.eval.report_plots import plot_vs_keep
from vitos_verl.eval.report_predictions import MAX_BAD_LISTED, Predictions, load_predictions, predictions_dir
from vitos_verl.eval.report_summary import (
    FULL,
    METHOD_ORDER,
    PUBLISHED,
    PUBLISHED_PROTOCOL,
    TABLE_BENCHMARKS,
    summarize,
)

__all__ = [
    "BENCHMARK_NAMES",
    "DEFAULT_CARDS",
    "FULL",
    "GT_COLOUR",
    "MAX_BAD_LISTED",
    "METHOD_NAMES",
    "METHOD_ORDER",
    "PRED_COLOUR",
    "PUBLISHED",
    "PUBLISHED_PROTOCOL",
    "TABLE_BENCHMARKS",
    "THUMB",
    "Predictions",
    "load_predictions",
    "main",
    "markdown_table",
    "render_markdown",
    "render_thumbnail",
    "summarize",
    "write_cards",
    "write_report",
]


def write_report(
    root: str | Path,
    out_dir: str | Path | None = None,
    reference: Any = None,
    cards: int = DEFAULT_CARDS,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Read ``<root>/predictions`` and write ``report.md``, ``report.json``, the two plots and ``cards.html``.

    Args:
        root: the evaluation output folder (holding ``predictions/`` and ``data/``).
        out_dir: where to write (default ``<root>/report``).
        reference: see :func:`summarize`.
        cards: at most this many questions on the cards page (0: none, but the page is written).
        data_dir: benchmark parquet folders (default ``<root>/data``).

    Returns:
        ``{"report.md": path, "report.json": ..., "accuracy_vs_keep.png": ..., "time_vs_keep.png": ...,
        "cards.html": ...}``.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_predictions(root)
    summary = summarize(records, reference)
    paths = {}
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text(render_markdown(summary, title=f"ViToS evaluation: {root.name}"), encoding="utf-8")
    paths["report.json"] = out_dir / "report.json"
    paths["report.json"].write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    paths["accuracy_vs_keep.png"] = plot_vs_keep(summary, out_dir / "accuracy_vs_keep.png", "accuracy")
    paths["time_vs_keep.png"] = plot_vs_keep(summary, out_dir / "time_vs_keep.png", "time")
    paths["cards.html"] = write_cards(records, out_dir, Path(data_dir) if data_dir else root / "data", cards)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (module doc): :func:`write_report`, then the first protocol's table and the files written, printed.

    Returns:
        0; 2 when ``root`` holds no predictions or the reference is malformed (the message on stderr).
    """
    p = argparse.ArgumentParser(prog="python -m vitos_verl.eval.report", description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="evaluation output folder (predictions/ and data/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <root>/report)")
    p.add_argument("--reference", default=None,
                   help="MODEL:METHOD, published:NAME (" + ", ".join(PUBLISHED) + ") or full "
                        "(default: the same model's full method)")
    p.add_argument("--cards", type=int, default=DEFAULT_CARDS, help="questions on cards.html (default %(default)s)")
    p.add_argument("--data", type=Path, default=None, help="benchmark parquet folders (default: <root>/data)")
    a = p.parse_args(argv)
    if not predictions_dir(a.root).is_dir():
        print(f"no predictions under {a.root}", file=sys.stderr)
        return 2
    try:
        paths = write_report(a.root, a.out, a.reference, a.cards, a.data)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = json.loads(paths["report.json"].read_text())
    print(markdown_table(summary, PROTOCOLS[0]))
    load = summary["load"] or {}
    print(f"\n{load.get('records', 0)} records, {load.get('bad_lines', 0)} malformed lines skipped")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
