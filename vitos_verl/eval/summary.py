"""Summary of a ViToS training run from its metrics files (verl's file tracking backend).

Reads every ``metrics-*.jsonl`` in the run directory (one per launch: a resumed run adds a
file) and prints, per step: both streams' rewards, accuracy, IoU, format rate, the keep
ratio, prompt/response tokens of both streams, the grad norm and optimiser steps of each
update, each stream's throughput and actor MFU (verl's) and the time of each stage; then the
last validation (two-pass inference on the held-out slice).

CLI::

    python -m vitos_verl.eval.summary outputs/runs/smoke_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

STEP_COLUMNS = [
    ("g score", "grounding/reward/score"),
    ("g IoU", "grounding/reward/iou"),
    ("g fmt", "grounding/reward/format"),
    ("g vary", "grounding/reward/groups_varying"),
    ("r score", "reasoning/reward/score"),
    ("r acc", "reasoning/reward/acc"),
    ("r fmt", "reasoning/reward/format"),
    ("r vary", "reasoning/reward/groups_varying"),
    ("keep", "vitos/keep_ratio"),
    ("g prompt", "grounding/prompt_tokens/mean"),
    ("r prompt", "reasoning/prompt_tokens/mean"),
    ("g resp", "grounding/response_tokens/mean"),
    ("r resp", "reasoning/response_tokens/mean"),
    ("gnorm g", "actor/grounding/grad_norm"),
    ("gnorm r", "actor/reasoning/grad_norm"),
    ("gnorm g+r", "actor/grounding+reasoning/grad_norm"),
    # optimiser steps each update took (vitos.optim_steps; equal for both streams by default)
    ("steps g", "actor/grounding/optim_steps"),
    ("steps r", "actor/reasoning/optim_steps"),
    ("steps g+r", "actor/grounding+reasoning/optim_steps"),
    # verl's throughput per stream: tokens per second per GPU over the stream's own stages
    ("tok/s g", "grounding/perf/throughput"),
    ("tok/s r", "reasoning/perf/throughput"),
    ("mfu g", "grounding/perf/mfu/actor"),
    ("mfu r", "reasoning/perf/mfu/actor"),
    ("mfu g+r", "grounding+reasoning/perf/mfu/actor"),
]


# the trainer's stages in step order (vitos_verl.trainer.ray_trainer)
STAGES = [
    f"timing_s/{s}"
    for s in (
        "gen_grounding", "prune", "gen_reasoning", "reward", "old_log_prob/grounding", "ref/grounding",
        "adv/grounding", "old_log_prob/reasoning", "ref/reasoning", "adv/reasoning", "update/grounding",
        "update/reasoning", "update/grounding+reasoning", "dump_rollout_generations", "save_checkpoint", "update_weights",
        "step",
    )
]


def load(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """Metrics per step, later launches overriding earlier ones for the same step.

    Raises:
        FileNotFoundError: no ``metrics-*.jsonl`` in ``run_dir``.
    """
    files = sorted(Path(run_dir).glob("metrics-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no metrics-*.jsonl in {run_dir}: was the run started with trainer.logger including 'file'?")
    steps: dict[int, dict[str, float]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return steps


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def render(steps: dict[int, dict[str, float]]) -> str:
    """The summary as text (tables of per-step metrics, stage times, last validation)."""
    train = {s: m for s, m in steps.items() if "grounding/reward/score" in m}
    cols = [(n, k) for n, k in STEP_COLUMNS if any(k in m for m in train.values())]
    lines = ["step | " + " | ".join(n for n, _ in cols)]
    for s in sorted(train):
        lines.append(f"{s} | " + " | ".join(_fmt(train[s].get(k)) for _, k in cols))
    stages = [k for k in STAGES if any(k in m for m in train.values())]
    if stages:
        lines += ["", "time per stage (s): step | " + " | ".join(k[len("timing_s/"):] for k in stages)]
        for s in sorted(train):
            lines.append(f"{s} | " + " | ".join(_fmt(train[s].get(k)) for k in stages))
    if train:
        g = sum(m.get("grounding/prompt_tokens/total", 0) for m in train.values())
        r = sum(m.get("reasoning/prompt_tokens/total", 0) for m in train.values())
        gn = sum(m.get("grounding/samples", 0) for m in train.values())
        rn = sum(m.get("reasoning/samples", 0) for m in train.values())
        if gn and rn:
            lines += [
                "",
                f"prompt tokens: grounding {g:.0f} over {gn:.0f} samples ({g / gn:.1f} each), "
                f"reasoning {r:.0f} over {rn:.0f} samples ({r / rn:.1f} each): "
                f"reasoning prompts are {r / rn / (g / gn):.3f} of grounding prompts; "
                f"{(g / gn - r / rn) * rn:.0f} prompt tokens saved against full-image reasoning prompts",
            ]
    val_steps = [s for s, m in steps.items() if any(k.startswith("val/") for k in m)]
    if val_steps:
        s = max(val_steps)
        val = {k: v for k, v in steps[s].items() if k.startswith("val/")}
        lines += ["", f"validation at step {s} (two-pass, greedy):"]
        lines += [f"  {k} = {_fmt(v)}" for k, v in sorted(val.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    print(render(load(a.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
