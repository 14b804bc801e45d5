"""End to end on the CPU, as a cluster user runs it: real SLAKE + VQA-RAD parquet, the tiny
Qwen2.5-VL warm-started through verl's SFT trainer, a local Ray head, and the smoke recipe
submitted with ``ray job submit --working-dir . -- bash launch/dualstream.sh``. The first job is
stopped once it has saved a checkpoint; a second job resumes from it and finishes.

Short by design (CI): one step per job, 4 questions a step. ``make demo`` is the longer version.
It computes in fp32 unless ``VITOS_CPU_DTYPE`` says otherwise: the path every x86 CPU runs at
full speed, so CI covers what an AVX2-only machine runs whatever CPU it is given
(``make demo`` takes the CPU's own choice, bf16 on AVX-512-BF16).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vitos_verl.platform import precision

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def _run(cmd, env, timeout, **kw):
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def outputs(data_dir, tmp_path_factory) -> Path:
    """Parquet of the real data and the warm-started tiny policy, in a fresh outputs dir."""
    out = tmp_path_factory.mktemp("e2e-outputs")
    env = {**_ray_env(), "OUT": str(out), "PY": sys.executable}
    py = sys.executable
    _run([py, "-m", "data_prep.slake", "--src", str(data_dir / "slake"), "--out", str(out / "data/slake"),
          "--splits", "train,val", "--limit", "400"], env, 900)
    _run([py, "-m", "data_prep.vqa_rad", "--src", str(data_dir / "vqa_rad"), "--out", str(out / "data/vqa_rad"),
          "--splits", "train", "--limit", "200"], env, 900)
    # the same warm start as `make demo`: fewer steps leave every reward at zero (no GRPO signal)
    _run(["bash", "scripts/warmstart_cpu.sh"], env, 1800)
    assert (out / "models/tiny-qwen2.5-vl-sft/model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head with the smoke recipe's resources (16 CPUs, 1 GPU slot for the colocated worker)."""
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = _ray_env()
    port = 8265 + os.getpid() % 500
    _run([str(BIN / "ray"), "start", "--head", "--num-cpus", "16", "--num-gpus", "1", "--dashboard-port", str(port),
          "--temp-dir", tmp, "--include-dashboard", "true", "--disable-usage-stats"], env, 300)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def _ray_env(**more) -> dict:
    # A local test cluster without token authentication (Ray 2.60 turns it on when a token file
    # exists in ~/.ray); head, CLI and job driver must agree on the mode.
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled", **more}
    env.setdefault(precision.ENV, "float32")
    return env


def _submit(address, outputs, args, env, job_id, wait=True):
    runtime_env = {"env_vars": {"RECIPE": "smoke_cpu", "VITOS_OUTPUTS": str(outputs), "PYTHON": sys.executable,
                                precision.ENV: env[precision.ENV],
                                "HF_HOME": os.environ.get("HF_HOME", ""), "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", "")}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", job_id,
           "--runtime-env-json", json.dumps(runtime_env)]
    if not wait:
        cmd.append("--no-wait")
    return _run(cmd + ["--", "bash", "launch/dualstream.sh", *args], env, 2400)


def _metrics(run_dir: Path) -> dict[int, dict]:
    from vitos_verl.eval.summary import load

    return load(run_dir)


def test_ray_job_submit_train_kill_resume(outputs, ray_head):
    env = _ray_env(RAY_ADDRESS=ray_head)
    run_dir = outputs / "runs" / "smoke_cpu"
    ckpt = run_dir / "ckpt"
    common = ["trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=2",
              "data.val_max_samples=4", "data.train_batch_size=4"]
    # job 1: stopped after its first checkpoint
    job = f"vitos-e2e-{os.getpid()}-1"
    _submit(ray_head, outputs, common, env, job, wait=False)
    deadline = time.time() + 1800
    while not (ckpt / "latest_checkpointed_iteration.txt").exists():
        status = _run([str(BIN / "ray"), "job", "status", "--address", ray_head, job], env, 60).stdout
        assert "FAILED" not in status, _run([str(BIN / "ray"), "job", "logs", "--address", ray_head, job], env, 60).stdout[-6000:]
        assert time.time() < deadline, "no checkpoint within 30 minutes"
        time.sleep(10)
    _run([str(BIN / "ray"), "job", "stop", "--address", ray_head, job], env, 300)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (ckpt / "global_step_1" / "data.pt").exists()
    first = _metrics(run_dir)
    assert 1 in first and 2 not in first
    m = first[1]
    # both updates ran, each with a gradient
    assert m["actor/grounding/grad_norm"] > 0 and m["actor/reasoning/grad_norm"] > 0
    # reasoning prompts are shorter than grounding prompts by the keep ratio
    assert m["reasoning/prompt_tokens/mean"] < m["grounding/prompt_tokens/mean"]
    assert m["vitos/keep_ratio"] < 1.0
    assert m["grounding/samples"] == 4 * 2 and m["reasoning/samples"] == 4 * 2 * 2
    # after the warm start, rewards differ within some GRPO groups of both streams
    assert m["grounding/reward/groups_varying"] > 0 and m["reasoning/reward/groups_varying"] > 0
    # job 2: resumes from global_step_1, runs step 2, validates two-pass
    logs = _submit(ray_head, outputs, common, env, f"vitos-e2e-{os.getpid()}-2").stdout
    assert "global_step_1" in logs
    both = _metrics(run_dir)
    assert 2 in both and both[2]["training/global_step"] == 2
    assert "val/acc" in both[2] and 0 < both[2]["val/keep_ratio"] <= 1
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    summary = _run([sys.executable, "-m", "vitos_verl.eval.summary", str(run_dir)], env, 120).stdout
    assert "reasoning prompts are" in summary and "validation at step 2" in summary
    shutil.rmtree(ckpt / "global_step_1", ignore_errors=True)
