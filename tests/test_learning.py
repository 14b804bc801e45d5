"""The trainer learns, in CI: a few dual-stream GRPO steps on the policy's own samples raise the
probability of the rewarded box and of the rewarded answer, in both CPU dtypes.

A rise that needs the image does not fit a CI budget on 2 cores (``make learn`` is that run); this
checks the learning loop's wiring on a reward the policy can learn without reading the image:
every target of the sparse-evidence task in one quadrant, one colour. Each step runs the real
trainer step in one process (``tests/_inprocess.py learn``: verl's agent-loop and reward-loop
workers, the trainer's ``train_step``, the ViToS actor worker on verl's FSDP engine, the
optimiser state carried across steps), with the "vLLM server" sampling each output from the
current policy restricted to the 4 quadrant boxes / 4 colour answers (softmax of the actor's
summed log-probs of each candidate, rescored before every step). A broken advantage, reward,
cross-feedback or update leaves the probabilities where the random policy put them.
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
STEPS = 4
# rise of each probability from the first scoring to the last. Measured (fp32 and bf16, this
# task, 4 steps): the right box 0.41-0.42 -> 0.72-0.75 and the right answer 0.22-0.23 -> 0.55-0.56,
# a rise of 0.30-0.34 that plateaus after the first step for the box (its groups turn all-right, so
# GRPO's advantage is zero); a broken update leaves both where step 0 put them.
MARGIN = 0.2


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from data_prep import sparse_evidence

    out = tmp_path_factory.mktemp("sparse_evidence_fixed")
    sparse_evidence.generate(out, seed=1, n_train=8, n_val=4, fixed=(3, "yellow"))
    return out


@pytest.fixture(scope="module")
def model(tiny_224_ckpt) -> Path:
    return tiny_224_ckpt


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rewarded_box_and_answer_become_likely(task, model, dtype, tmp_path):
    if dtype == "bfloat16" and not precision.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX-512-BF16): the bf16 path is not what it runs")
    out = tmp_path / "learn.json"
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           precision.ENV: dtype, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LEARN_STEPS": str(STEPS)}  # fmt: skip
    overrides = ["data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "vitos.n_g=4", "vitos.n_r=2",
                 # the wiring check's own settings, not make learn's: a constant lr, no KL (the
                 # in-process harness has no reference worker), the paper's cross-feedback
                 "actor_rollout_ref.actor.optim.lr=1e-4", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
                 "actor_rollout_ref.actor.use_kl_loss=false", "vitos.feedback_scale=none"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tests" / "_inprocess.py"), "learn", str(out), str(task), str(model), *overrides]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    steps = json.loads(out.read_text())["steps"]
    print(dtype, json.dumps(steps))
    assert len(steps) == STEPS + 1
    first, last = steps[0], steps[-1]
    for key in ("p_right_box", "p_right_answer"):
        assert last[key] - first[key] >= MARGIN, (dtype, key, [round(s[key], 3) for s in steps])
    # the sampled rewards follow: the last step's above the first's in both streams
    for key in ("grounding/reward/score", "reasoning/reward/score"):
        assert steps[-2][key] > steps[0][key], (dtype, key, [s.get(key) for s in steps])
