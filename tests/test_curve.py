"""Learning curves from a run's metrics (vitos_verl.eval.curve; `make curve` runs 100+ steps first)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitos_verl.eval.curve import main as curve_main
from vitos_verl.eval.curve import moving_average, plot_curves, series

ROOT = Path(__file__).resolve().parents[1]


def _metrics_file(run: Path, steps: int, start: int = 1, name: str = "metrics-20260101-000000.jsonl") -> None:
    """A metrics file as verl's file backend writes it: {"step", "data"} per line."""
    rng = np.random.RandomState(0)
    with open(run / name, "w") as f:
        for s in range(start, start + steps):
            data = {f"{st}/reward/{k}": float(rng.rand()) for st in ("grounding", "reasoning")
                    for k in ("score", "iou", "acc", "format", "keep_ratio")}
            data["training/global_step"] = s
            f.write(json.dumps({"step": s, "data": data}) + "\n")
            if s % 5 == 0:  # a validation logged with the step
                f.write(json.dumps({"step": s, "data": {"val/acc": 0.5, "val/keep_ratio": 0.4}}) + "\n")


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1, 2, 3], 10).tolist() == [1.0, 1.5, 2.0]
    out = moving_average([1, np.nan, 3, 5], 2)
    assert out.tolist() == [1.0, 1.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        moving_average([1], 0)


def test_plot_from_a_small_metrics_file(tmp_path):
    _metrics_file(tmp_path, 12)
    _metrics_file(tmp_path, 4, start=11, name="metrics-20260101-000100.jsonl")  # a resumed launch
    from vitos_verl.eval.summary import load

    steps = load(tmp_path)
    x, y = series(steps, "reasoning/reward/acc")
    assert x.tolist() == list(range(1, 15)) and len(y) == 14
    assert series(steps, "val/acc")[0].tolist() == [5, 10]
    out = plot_curves(steps, tmp_path / "c.png", window=3)
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (int(4.2 * 5 * 100), 400)
    assert np.asarray(img.convert("L")).std() > 5  # something is drawn
    assert curve_main([str(tmp_path), "--window", "4"]) == 0 and (tmp_path / "curve.png").exists()
    with pytest.raises(ValueError, match="no training step"):
        plot_curves({1: {"val/acc": 0.5}}, tmp_path / "x.png")


def test_make_curve_runs_the_script():
    mk = (ROOT / "Makefile").read_text()
    assert "curve: warmstart" in mk and "scripts/curve_cpu.sh" in mk
    script = ROOT / "scripts" / "curve_cpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "trainer.total_training_steps=\"$STEPS\"" in text and "vitos_verl.eval.curve" in text
