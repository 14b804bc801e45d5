"""Reading the evaluation runner's predictions back: every JSONL record, with a count of what was skipped.

The layout (:mod:`vitos_verl.eval.runner` writes it), one JSONL file per (model, benchmark, method)::

    <root>/predictions/<model>/<benchmark>/<method>.jsonl      one JSON object per question
                                     (or <method>.shard<i>of<n>.jsonl: the shards are merged)
    <root>/predictions/<model>/<benchmark>/load_report.json    optional: rows in/out, skipped by reason

Part of the evaluation report (:mod:`vitos_verl.eval.report`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Malformed lines listed one by one in the load report (the rest are only counted).
MAX_BAD_LISTED = 50


class Predictions(list):
    """The records of :func:`load_predictions` (a ``list[dict]``) with its load report.

    Attributes:
        report: ``files``, ``lines`` (non-blank), ``records`` (kept), ``bad_lines`` (count),
            ``bad`` (the first :data:`MAX_BAD_LISTED` as ``{file, line, error}``),
            ``path_mismatch`` (records whose model/benchmark/method differ from their file's
            path; the record's own values are kept), ``duplicates`` (a uid seen again in the same
            model/benchmark/method: the last one is kept) and ``load_reports``
            (``{"<model>/<benchmark>": contents of load_report.json}``).
    """

    report: dict[str, Any]


_SHARD = re.compile(r"\.shard\d+of\d+$")


def _key_of(path: Path, pred_dir: Path) -> tuple[str, str, str]:
    """``(model, benchmark, method)`` from ``<pred_dir>/<model...>/<benchmark>/<method>[.shardIofN].jsonl``."""
    parts = path.relative_to(pred_dir).parts
    model = "/".join(parts[:-2]) if len(parts) > 2 else ""
    benchmark = parts[-2] if len(parts) > 1 else ""
    return model, benchmark, _SHARD.sub("", path.stem)


def predictions_dir(root: str | Path) -> Path:
    """``<root>/predictions`` if that folder exists, else ``root`` itself (a predictions folder given directly)."""
    root = Path(root)
    return root / "predictions" if (root / "predictions").is_dir() else root


def load_predictions(root: str | Path) -> Predictions:
    """Every prediction record under ``<root>/predictions`` (or ``root`` itself if it has no such folder).

    Malformed lines (not JSON, not an object, no ``uid``) are skipped and counted in the returned
    list's ``report`` (:class:`Predictions`), never raised. A record missing ``model``,
    ``benchmark`` or ``method`` gets it from its path. Within one (model, benchmark, method) a
    repeated ``uid`` replaces the earlier record (a resumed run appending), counted as a duplicate.

    Returns:
        :class:`Predictions`: a ``list[dict]`` in file order, with ``.report``.
    """
    pred_dir = predictions_dir(Path(root))
    report: dict[str, Any] = {
        "root": str(pred_dir),
        "files": 0,
        "lines": 0,
        "records": 0,
        "bad_lines": 0,
        "bad": [],
        "path_mismatch": 0,
        "duplicates": 0,
        "load_reports": {},
    }
    by_key: dict[tuple[str, str, str, str], dict] = {}

    def bad(file: Path, lineno: int, error: str) -> None:
        report["bad_lines"] += 1
        if len(report["bad"]) < MAX_BAD_LISTED:
            report["bad"].append({"file": str(file.relative_to(pred_dir)), "line": lineno, "error": error})

    for path in sorted(pred_dir.rglob("*.jsonl")):
        report["files"] += 1
        model, benchmark, method = _key_of(path, pred_dir)
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                report["lines"] += 1
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(path, lineno, f"not JSON: {e.msg} (column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    bad(path, lineno, f"not a JSON object but {type(rec).__name__}")
                    continue
                if rec.get("uid") in (None, ""):
                    bad(path, lineno, "no uid")
                    continue
                mismatch = False
                for k, v in (("model", model), ("benchmark", benchmark), ("method", method)):
                    if rec.get(k) in (None, ""):
                        rec[k] = v
                    elif str(rec[k]) != v:
                        mismatch = True
                    rec[k] = str(rec[k])
                report["path_mismatch"] += mismatch
                key = (rec["model"], rec["benchmark"], rec["method"], str(rec["uid"]))
                if key in by_key:
                    report["duplicates"] += 1
                    del by_key[key]  # re-insert at the end: the last one wins
                by_key[key] = rec
    for path in sorted(pred_dir.rglob("load_report.json")):
        rel = str(path.parent.relative_to(pred_dir))
        try:
            report["load_reports"][rel] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            report["load_reports"][rel] = {"error": f"unreadable load_report.json: {e}"}
    out = Predictions(by_key.values())
    report["records"] = len(out)
    out.report = report
    return out
