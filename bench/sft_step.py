"""What one step of the warm start costs: verl's SFT trainer against ``vitos_verl.trainer.sft_warmstart``.

Both arms are the same command (``torchrun -m <module> --config-name sft_warmstart_cpu``, the
``make learn`` warm start's settings: batch 16, micro-batch 16, lr 1e-3, max length 256) on the
same SFT parquet of the controlled task (``data_prep.sparse_evidence``, both streams' examples,
224 x 224 images: 64 visual tokens) and the same random ``learn``-size policy
(:mod:`vitos_verl.models.tiny`); only the module differs. verl 0.9.1 without remove-padding
computes the LM head over the 151,665-token vocabulary at every prompt position; the hook
computes it from the loss mask's first token (``vitos_verl/compat/verl_0_9.py``). The arms run
one after the other, each ``--steps`` steps twice as long as ``--warm`` steps, so start-up
(Ray-free, but torchrun, model build, data loading) cancels: the seconds per step are
``(t(steps) - t(warm)) / (steps - warm)``. The last line is
``sft_step: verl=<s>/step vitos=<s>/step ratio=<x>``.

    python bench/sft_step.py                     # ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(module: str, steps: int, model: Path, data: Path, work: Path) -> float:
    run = work / f"{module.rsplit('.', 1)[-1]}-{steps}"
    run.mkdir(parents=True)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", module,
           "--config-path", str(ROOT / "recipes"), "--config-name", "sft_warmstart_cpu", f"outputs_dir={work}",
           f"model.path={model}", f"data.train_files={data}", "data.train_batch_size=16", "data.micro_batch_size_per_gpu=16",
           "data.max_length=256", "optim.lr=1e-3", "model.enable_gradient_checkpointing=false",
           f"trainer.total_training_steps={steps}", "trainer.logger=[console]", f"trainer.default_local_dir={run}",
           "checkpoint.save_contents=[model]"]  # fmt: skip
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{module} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    from data_prep import sparse_evidence
    from vitos_verl.data import sft
    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--size", default="learn", choices=sorted(SIZES))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_checkpoint(work / "model", replace(SIZES[a.size], max_pixels=50176))
        sparse_evidence.generate(work / "task", seed=0, n_train=256, n_val=2)
        data = work / "sft.parquet"
        sft.main(["--out", str(data), "--max-pixels", "50176", "--inputs", str(work / "task" / "train.parquet")])
        per_step = {}
        for name, module in (("verl", "verl.trainer.sft_trainer"), ("vitos", "vitos_verl.trainer.sft_warmstart")):
            short, long = (_run(module, n, model, data, work) for n in (a.warm, a.steps))
            per_step[name] = (long - short) / (a.steps - a.warm)
            print(f"{name}: {a.warm} steps {short:.1f} s, {a.steps} steps {long:.1f} s", flush=True)
    print(f"sft_step: verl={per_step['verl']:.2f}s/step vitos={per_step['vitos']:.2f}s/step "
          f"ratio={per_step['verl'] / per_step['vitos']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
