"""The learning report's arithmetic and targets (vitos_verl.eval.learn_report) and the ablation
table (vitos_verl.eval.ablations), on run folders in the trainer's metrics format and prediction
files in the evaluation harness's record format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitos_verl.eval import ablations, learn_report


def _write_run(path, grounding, reasoning, val_acc=(0.4, 0.7), val_iou=(0.4, 0.7)):
    """A run folder as the trainer's file logger writes it: one ``{"step", "data"}`` line per step."""
    path.mkdir(parents=True)
    lines = [{"step": 0, "data": {"val/acc": val_acc[0], "val/sparse_evidence/iou": val_iou[0], "val/rows": 128}}]
    for i, (g, r) in enumerate(zip(grounding, reasoning), start=1):
        lines.append({"step": i, "data": {"grounding/reward/score": g, "reasoning/reward/score": r}})
    lines[-1]["data"].update({"val/acc": val_acc[1], "val/sparse_evidence/iou": val_iou[1]})
    (path / "metrics-20261207-000000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_window_stats_pooled_noise_and_rise():
    rng = np.random.default_rng(0)
    flat = rng.normal(1.0, 0.1, 30)
    s = learn_report.window_stats(flat, 10)
    a, b = flat[:10], flat[-10:]
    pooled = np.sqrt((((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()) / 18)
    assert s["step_noise"] == pytest.approx(pooled) and s["rise"] == pytest.approx(b.mean() - a.mean())
    assert s["rises"] == 0.0
    up = np.concatenate([flat[:10], flat[10:20] + 0.3, flat[20:] + 0.6])
    assert learn_report.window_stats(up, 10)["rises"] == 1.0
    with pytest.raises(ValueError):
        learn_report.window_stats(flat[:15], 10)


def test_targets_need_both_streams_to_rise_and_the_control_to_stay_flat(tmp_path):
    rng = np.random.default_rng(1)
    rising = np.linspace(0.8, 1.6, 30) + rng.normal(0, 0.05, 30)
    flat = 1.0 + rng.normal(0, 0.05, 30)
    run = learn_report.summarize(_write_run(tmp_path / "run", rising, rising))
    control = learn_report.summarize(_write_run(tmp_path / "control", flat, flat, (0.4, 0.45), (0.4, 0.4)))
    met = learn_report.check(run, control)
    assert all(met.values()), met
    assert run["val"]["acc"] == [0.4, 0.7] and run["val"]["iou"] == [0.4, 0.7]
    # a reasoning stream that does not rise, a control that does, a validation gain under 0.20
    half = learn_report.summarize(_write_run(tmp_path / "half", rising, flat, (0.4, 0.55)))
    met = learn_report.check(half, run)
    assert not met["reasoning_reward_rises"] and met["grounding_reward_rises"]
    assert not met["control_grounding_reward_flat"] and not met["val_acc_gain>=0.2"]
    line = learn_report.summary_line(run)
    assert line.startswith("learn: val_acc=0.40->0.70 val_iou=0.40->0.70 grounding_reward=")


def _records(model: str, method: str, right: int, n: int = 8, keep: float = 0.4):
    return [{"model": model, "benchmark": "sparse_evidence", "method": method, "uid": f"val-{i}",
             "correct": {"strict": i < right}, "keep_ratio": keep if method != "full" else 1.0,
             "iou": 0.5 if method == "vitos" else None, "time_s": 0.1} for i in range(n)]  # fmt: skip


def test_ablation_table_reads_each_variants_run_and_predictions(tmp_path):
    rng = np.random.default_rng(2)
    y = np.linspace(0.8, 1.6, 30) + rng.normal(0, 0.05, 30)
    runs = {
        "vitos": _write_run(tmp_path / "runs" / "a", y, y),
        "joint": _write_run(tmp_path / "runs" / "b", y, y, (0.4, 0.5)),
    }
    pred = tmp_path / "eval" / "predictions"
    for model, per in {
        "vitos": {"full": 4, "vitos": 6, "oracle": 7, "random": 2},
        "joint": {"full": 3, "vitos": 5},
    }.items():
        for method, right in per.items():
            f = pred / model / "sparse_evidence" / f"{method}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps(r) + "\n" for r in _records(model, method, right)))
    rows = ablations.table(runs, tmp_path / "eval")
    assert [r["variant"] for r in rows] == ["vitos", "joint"]
    assert rows[0]["accuracy"] == {"full": 50.0, "vitos": 75.0, "crop": None, "oracle": 87.5, "random": 25.0}
    assert rows[1]["accuracy"]["oracle"] is None and rows[1]["val_acc"] == [0.4, 0.5]
    assert rows[0]["keep_ratio"] == pytest.approx(0.4) and rows[0]["iou"] == pytest.approx(0.5)
    md = ablations.markdown(rows)
    assert "| vitos: ViToS as configured" in md and "| 50.0 | 75.0 | - | 87.5 | 25.0 |" in md
    assert ablations.main(["--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "out"), "bad"]) == 2
    assert ablations.main(["--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "out"),
                           *(f"{k}={v}" for k, v in runs.items())]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / "ablations.json").read_text()) == rows
    assert (tmp_path / "out" / "ablations.png").stat().st_size > 0
