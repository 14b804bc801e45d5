"""Two Ray nodes on one machine, as a cluster runs the trainer: FSDP over two ranks on two nodes,
two vLLM replicas, a checkpoint, the loss of the worker node, and a resume.

``make two-node`` runs it (not in CI: about 15 minutes on 2 cores; ``pytest -m two_node``). It
needs ``make warmstart``'s data and warm-started tiny policy in ``$VITOS_OUTPUTS`` (default
``./outputs``); runs go to a fresh folder beside them.

* A head and a second node, separate ``ray start`` processes with one fake GPU each and token
  authentication on (Ray 2.60, "Ray token authentication": ``RAY_AUTH_MODE=token`` and the
  token file ``RAY_AUTH_TOKEN_PATH`` on both nodes, the CLI and the jobs), as
  ``launch/slurm/dualstream.sbatch`` starts them.
* A one-node job of the same size first: the step time the two-node run is compared with.
* Job 1: ``launch/dualstream.sh`` with ``trainer.nnodes=2 trainer.n_gpus_per_node=1`` through
  ``ray job submit``. Ray's state API shows the two FSDP workers and the two ``vLLMHttpServer``
  replicas on different nodes. Once step 1's checkpoint exists (one shard per rank), the worker
  node's processes are killed (``SIGKILL``: a lost machine), the job stops.
* Job 2, after the worker node rejoins: resumes from the last checkpoint and finishes.
* From the servers' own counters (``rollout/replica_<i>/*``, :mod:`vitos_verl.trainer.vit_cache_metrics`):
  both replicas served pruned requests, every image of a step was served by one replica
  (a question's requests stay on its replica), and the ViT-cache totals are the replicas' sum.

The figures (step time against one node, requests per replica, the resume step) are printed and
written to ``two_node.json`` in the runs' folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from vitos_verl.platform import precision

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.two_node

STEPS = 3
# 4 questions a step: 8 grounding and 16 reasoning samples, 4 and 8 per rank on two ranks
# (whole micro-batches of 4; vitos_verl.trainer.checks.check_data_parallel). vLLM 0.24's CPU build
# sizes its KV cache as gpu_memory_utilization x the machine's memory less the worker's own:
# two replicas at the recipe's 0.15 push this 24 GB machine into Ray's memory monitor, which kills
# workers. A fixed 512 MiB each (kv_cache_memory_bytes) holds the tiny policy's sequences many
# times over.
SIZE = ["data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "data.val_max_samples=4",
        "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=536870912",
        f"trainer.total_training_steps={STEPS}", "trainer.save_freq=1", f"trainer.test_freq={STEPS}"]
TWO_NODES = ["trainer.nnodes=2", "trainer.n_gpus_per_node=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=300, check=True):
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


class Cluster:
    """A Ray head and one worker node on this machine, token authentication on."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tempfile.mkdtemp(prefix="r2n", dir="/tmp"))  # Ray's socket paths must stay short
        token = tmp / "auth_token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        env.update({"RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
        env.setdefault(precision.ENV, "float32")
        self.env = env
        self.gcs = f"127.0.0.1:{_free_port()}"
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.worker: subprocess.Popen | None = None

    def start_head(self) -> None:
        _run([str(BIN / "ray"), "start", "--head", "--port", self.gcs.split(":")[1], "--num-cpus", "8", "--num-gpus", "1",
              "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true", "--temp-dir", str(self.tmp),
              "--disable-usage-stats"], self.env)

    def start_worker(self) -> None:
        """The second node: its own ``ray start`` process (``--block``: it lives as long as its node)."""
        self.worker = subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", self.gcs, "--num-cpus", "8", "--num-gpus", "1", "--block",
             "--disable-usage-stats"],
            env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_nodes(2)

    def alive_nodes(self) -> list[dict]:
        out = _run([str(BIN / "ray"), "list", "nodes", "--address", self.gcs, "--format", "json", "--limit", "100"],
                   self.env, check=False)
        if out.returncode:
            return []
        return [n for n in json.loads(out.stdout) if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while len(self.alive_nodes()) != n:
            assert time.time() < deadline, f"the cluster did not reach {n} alive nodes in {timeout} s"
            time.sleep(3)

    def kill_worker(self) -> int:
        """SIGKILL the worker node's processes (its raylet, workers, vLLM engines): a lost machine.
        Returns how many processes were killed."""
        root = psutil.Process(self.worker.pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return len(procs)

    def actors(self) -> list[dict]:
        out = _run([str(BIN / "ray"), "list", "actors", "--address", self.gcs, "--format", "json", "--detail",
                    "--limit", "1000", "--filter", "state=ALIVE"], self.env)
        return json.loads(out.stdout)

    def submit(self, outputs: Path, name: str, args: list[str], wait: bool = True) -> subprocess.CompletedProcess:
        runtime_env = {"env_vars": {"RECIPE": "smoke_cpu", "VITOS_OUTPUTS": str(outputs), "PYTHON": sys.executable,
                                    precision.ENV: self.env[precision.ENV],
                                    "HF_HOME": os.environ.get("HF_HOME", ""),
                                    "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", "")}}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", ".", "--submission-id",
               name, "--runtime-env-json", json.dumps(runtime_env)]
        if not wait:
            cmd.append("--no-wait")
        deadline = time.time() + 180
        while True:  # a fresh head's job agent takes a while to register ("No available agent")
            out = _run(cmd + ["--", "bash", "launch/dualstream.sh", *args], self.env, 2400, check=False)
            if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
                break
            time.sleep(5)
        assert out.returncode == 0, f"{name} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out

    def job_status(self, name: str) -> str:
        return _run([str(BIN / "ray"), "job", "status", "--address", self.address, name], self.env, 60).stdout

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.kill_worker()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """A fresh outputs folder whose data and models are make warmstart's (linked, read only)."""
    src = Path(os.environ.get("VITOS_OUTPUTS", ROOT / "outputs")).resolve()
    need = [src / "data/slake/train.parquet", src / "data/vqa_rad/train.parquet",
            src / "models/tiny-qwen2.5-vl-sft/model.safetensors"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        pytest.fail(f"run `make warmstart` first (VITOS_OUTPUTS={src}): missing {missing}")
    out = tmp_path_factory.mktemp("two-node")
    for d in ("data", "models"):
        (out / d).symlink_to(src / d)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray-token"))
    c.start_head()
    try:
        c.start_worker()
        yield c
    finally:
        c.stop()


def _metrics(run_dir: Path) -> dict[int, dict]:
    from vitos_verl.eval.summary import load

    return load(run_dir)


def _step_time(metrics: dict[int, dict], steps) -> float:
    return sum(metrics[s]["timing_s/step"] for s in steps) / len(steps)


def _check_replicas(run_dir: Path, metrics: dict[int, dict], steps) -> dict[str, float]:
    """The routing and the summed ViT-cache metrics, from the servers' own counters; returns the
    pruned image items each replica served over ``steps``."""
    from vitos_verl.trainer.rollout_dump import read_jsonl

    served = {"replica_0": 0.0, "replica_1": 0.0}
    for s in steps:
        m = metrics[s]
        assert "rollout/replica_2/image_items" not in m  # two replicas, no more
        items = [m[f"rollout/replica_{i}/image_items"] for i in (0, 1)]
        assert sum(items) == m["rollout/vit_cache/hits"] + m["rollout/vit_cache/misses"]  # totals = the sum
        for i in (0, 1):
            served[f"replica_{i}"] += items[i]
        rows = read_jsonl(run_dir / "rollouts" / f"{s}_reasoning.jsonl")
        images = {r["record_id"]: r["image"] for r in rows}
        if len(set(images.values())) == len(images):  # no two questions share an image this step
            assert m["rollout/vit_cache/split_images"] == 0, (s, m)  # each image on one replica
            assert m["rollout/replica_0/images"] + m["rollout/replica_1/images"] == len(images), (s, m)
    assert min(served.values()) > 0, served  # the balancer used both replicas
    return served


def test_two_nodes_fsdp_two_replicas_checkpoint_node_loss_resume(outputs, cluster):
    figures: dict = {}
    # the baseline: one node, one FSDP rank, one replica; same questions per step
    one = cluster.submit(outputs, f"one-node-{os.getpid()}", [*SIZE, "trainer.experiment_name=one_node"])
    assert "launch/dualstream.sh: recipe=smoke_cpu" in one.stdout
    one_m = _metrics(outputs / "runs" / "one_node")
    assert sorted(one_m) == list(range(1, STEPS + 1))
    assert "rollout/replica_1/image_items" not in one_m[1]

    run_dir = outputs / "runs" / "two_node"
    ckpt = run_dir / "ckpt"
    args = [*SIZE, *TWO_NODES, "trainer.experiment_name=two_node"]
    job1 = f"two-node-{os.getpid()}-1"
    cluster.submit(outputs, job1, args, wait=False)
    deadline, placed = time.time() + 1500, None
    while not (ckpt / "latest_checkpointed_iteration.txt").exists():
        status = cluster.job_status(job1)
        assert "FAILED" not in status and "SUCCEEDED" not in status, status
        assert time.time() < deadline, "no checkpoint within 25 minutes"
        if placed is None:  # where Ray put the FSDP workers and the rollout servers, while they live
            actors = cluster.actors()
            fsdp = {a["node_id"] for a in actors if a["class_name"].endswith("WorkerDict")}
            servers = {a["node_id"] for a in actors if a["class_name"].endswith("vLLMHttpServer")}
            if len(fsdp) == 2 and len(servers) == 2:
                placed = {"fsdp_nodes": len(fsdp), "replica_nodes": len(servers)}
        time.sleep(5)
    assert placed == {"fsdp_nodes": 2, "replica_nodes": 2}, placed
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved < STEPS
    shards = sorted(p.name for p in (ckpt / f"global_step_{saved}" / "actor").glob("model_world_size_*"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"], shards

    figures["killed_processes"] = cluster.kill_worker()  # the worker node is lost
    t0 = time.time()
    while "FAILED" not in (status := cluster.job_status(job1)) and time.time() - t0 < 300:
        time.sleep(5)
    figures["job1_after_node_loss"] = "FAILED" if "FAILED" in status else "stopped"
    if "FAILED" not in status:  # a collective waiting on the lost rank: stop the job, as a user would
        _run([str(BIN / "ray"), "job", "stop", "--address", cluster.address, job1], cluster.env, 300, check=False)
    figures["job1_end_s"] = round(time.time() - t0, 1)
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())  # it may have saved once more

    cluster.start_worker()  # the node rejoins (or a replacement machine)
    job2 = cluster.submit(outputs, f"two-node-{os.getpid()}-2", args)
    assert f"global_step_{saved}" in job2.stdout + job2.stderr  # resumed from the last checkpoint
    m = _metrics(run_dir)
    assert sorted(m) == list(range(1, STEPS + 1)), sorted(m)
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) == STEPS
    resumed = list(range(saved + 1, STEPS + 1))
    assert resumed and all(m[s]["training/global_step"] == s for s in resumed)
    for s in m:  # both updates ran on two ranks; a stream whose groups all tie has no policy gradient
        for stream in ("grounding", "reasoning"):
            if m[s][f"{stream}/reward/groups_varying"] > 0:
                assert m[s][f"actor/{stream}/grad_norm"] > 0, (s, stream)
    assert "val/acc" in m[STEPS]
    served = _check_replicas(run_dir, m, sorted(m))

    # step 1 of each run pays the engines' first batches: compare the steps after it
    later = list(range(2, STEPS + 1))
    figures.update(
        resume_step=saved + 1,
        step_s_one_node=round(_step_time(one_m, later), 2),
        step_s_two_nodes=round(_step_time(m, later), 2),
        pruned_items_per_replica=served,
        images_per_replica={f"replica_{i}": sum(m[s][f"rollout/replica_{i}/images"] for s in m) for i in (0, 1)},
        split_images=sum(m[s]["rollout/vit_cache/split_images"] for s in m),
        placement=placed,
    )
    figures["two_over_one_step_time"] = round(figures["step_s_two_nodes"] / figures["step_s_one_node"], 2)
    (outputs / "runs" / "two_node.json").write_text(json.dumps(figures, indent=1))
    print("two-node figures:", json.dumps(figures))
