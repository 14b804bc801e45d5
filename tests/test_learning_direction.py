"""Direction of one ViToS update, per stream, through the real worker: a sample with a positive
advantage becomes more likely under the updated policy and one with a negative advantage less
likely; in the grounding stream the advantage comes from cross-feedback alone (a box whose
answers were right must become more likely), in the reasoning stream the answers were made from
the pruned visual tokens their box kept.

The step runs in its own process (``tests/_inprocess.py direction``: verl's CPU platform is chosen when verl
is imported) on two questions of the sparse-evidence task whose evidence shares a quadrant: the
scripted policy proposes box A (the evidence) and box B (the opposite quadrant) for each, and
answers right exactly when its request's keep mask covers the evidence. Without that
alignment (an advantage attached to another sample, cross-feedback credited to the wrong box,
log-probs of other tokens than were sampled) the signs below flip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitos_verl.platform import precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from data_prep import sparse_evidence

    out = tmp_path_factory.mktemp("sparse_evidence")
    sparse_evidence.generate(out, seed=0, n_train=16, n_val=4)
    return out


@pytest.fixture(scope="module")
def model(tiny_224_ckpt) -> Path:
    return tiny_224_ckpt


def _step(task: Path, model: Path, dtype: str, tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "direction.json"
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           precision.ENV: dtype, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    direction = [
        # the grounding reward is the cross-feedback alone: a box earns what its answers earned
        "vitos.n_g=2", "vitos.n_r=2", "vitos.w_iou=0.0", "vitos.w_fmt=0.0", "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        # plain SGD: an update follows the policy gradient (Adam's first step is its sign)
        "actor_rollout_ref.actor.optim.optimizer=SGD", "actor_rollout_ref.actor.optim.lr=0.05",
        "actor_rollout_ref.actor.optim.weight_decay=0.0", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        # no KL term (the in-process harness has no reference worker); the paper's cross-feedback
        "actor_rollout_ref.actor.use_kl_loss=false", "vitos.feedback_scale=none",
    ]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tests" / "_inprocess.py"), "direction", str(out), str(task), str(model)]
    run = subprocess.run([*cmd, *direction, *overrides],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_update_moves_its_samples_the_way_their_advantages_say(task, model, dtype, tmp_path):
    if dtype == "bfloat16" and not precision.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX-512-BF16): the bf16 path is not what it runs")
    res = _step(task, model, dtype, tmp_path)
    g, r = res["streams"]["grounding"], res["streams"]["reasoning"]
    assert len(g) == 4 and len(r) == 8  # 2 questions x 2 boxes, x 2 answers each

    # cross-feedback: the evidence box earned its answers' accuracy (1), the other box 0
    boxes = {s["text"]: s["score"] for s in g}
    assert len(boxes) == 2 and sorted(boxes.values()) == [0.0, 1.0], boxes
    for s in g:
        assert s["acc"] == s["score"] and s["keep_ratio"] == pytest.approx(25 / 64)  # a quadrant + 1 cell of margin
    # the answers were made from 25 of 64 visual tokens; right under box A only
    for s in r:
        assert s["keep_ratio"] == pytest.approx(25 / 64)
    assert sum(s["acc"] for s in r) == 4

    for stream, samples in (("grounding", g), ("reasoning", r)):
        for s in samples:
            assert abs(s["advantage"]) > 0.5, (stream, s)  # each group holds a right and a wrong sample
            assert (s["advantage"] > 0) == (s["score"] > 0), (stream, s)
            # the updated policy: more likely where the advantage was positive, less where negative
            assert (s["delta_logp"] > 0) == (s["advantage"] > 0), (stream, dtype, s)
            assert abs(s["delta_logp"]) > 1e-3, (stream, dtype, s)
    assert res["metrics"]["grounding/reward/feedback"] == 0.5 and res["metrics"]["reasoning/reward/acc"] == 0.5


def test_the_control_run_breaks_the_link_between_reward_and_advantage(task, model, tmp_path):
    """``vitos.shuffle_rewards`` (make learn's control): the logged rewards stay the true ones, the
    advantages come from rewards permuted across the step's samples."""
    res = _step(task, model, "float32", tmp_path, "vitos.shuffle_rewards=true")
    aligned = {}
    for stream in ("grounding", "reasoning"):
        samples = res["streams"][stream]
        assert sorted({s["score"] for s in samples}) == [0.0, 1.0]  # true scores logged
        assert sum(s["score"] for s in samples) == len(samples) / 2
        aligned[stream] = [(s["advantage"] > 0) == (s["score"] > 0) for s in samples if s["advantage"] != 0]
    # the step's seeded permutation: 8 reasoning rewards (4 right) stay in place with chance 1/70;
    # the 4 grounding ones (2 right) with chance 1/6, as they happen to at this step
    assert not all(aligned["reasoning"]), res["streams"]["reasoning"]
