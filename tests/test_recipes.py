"""Every recipe composes with verl 0.9.1's ppo_trainer, passes the trainer's start-up checks,
points at the files the project writes, and the launch scripts dry-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RL_RECIPES = sorted(
    p.stem for p in RECIPES.glob("*.yaml") if not p.stem.startswith(("_", "eval")) and "sft" not in p.stem
)
EVAL_RECIPES = sorted(p.stem for p in RECIPES.glob("eval*.yaml"))


def _compose(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _make_data_files(cfg) -> None:
    """Create (empty) the parquet files a composed recipe names: the start-up check wants them to exist."""
    train = cfg.data.train_files
    files = ([train] if isinstance(train, str) else list(train)) + [cfg.data.val_files]
    for f in files:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).touch()


def test_recipe_list():
    assert {"smoke_cpu", "lingshu7b", "huatuogpt_vision7b", "qwen25vl3b_1node", "qwen25vl7b_1node"} <= set(RL_RECIPES)
    assert {"lingshu32b", "vitar16k_lingshu7b"} <= set(RL_RECIPES) and "eval_lingshu32b" in EVAL_RECIPES
    assert {"lingshu7b_stage1", "lingshu7b_stage2"} <= set(RL_RECIPES)  # the two-stage schedule
    # the Docker image composes every GPU recipe
    docker = (ROOT / "Dockerfile").read_text()
    assert all(r in docker for r in RL_RECIPES if not r.endswith("_cpu"))


def test_single_node_recipes():
    """One node x 8 GPUs, the model from MODEL_PATH (a hub id by default), the 2-node recipes unchanged."""
    for name, model, tp in (("qwen25vl3b_1node", "Qwen/Qwen2.5-VL-3B-Instruct", 1), ("qwen25vl7b_1node", "Qwen/Qwen2.5-VL-7B-Instruct", 2)):
        cfg = _compose(name)
        assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (1, 8), name
        assert cfg.actor_rollout_ref.model.path == model and cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
        assert cfg.data.train_batch_size // cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 4  # as the 2-node recipes
    assert _compose("lingshu7b").trainer.nnodes == 2
    assert {f"ablation_{a}" for a in ("no_feedback", "joint_loss", "no_prune", "crop", "lowres_grounding")} <= set(RL_RECIPES)


@pytest.mark.parametrize("name", RL_RECIPES)
def test_recipe_composes_and_checks(name, monkeypatch, tmp_path):
    from vitos_verl.trainer.config import ViToSConfig
    from vitos_verl.trainer.main import check_config

    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    cfg = _compose(name)
    OmegaConf.resolve(cfg)
    with pytest.raises(ValueError, match="data.train_files: missing"):
        check_config(cfg)
    _make_data_files(cfg)
    check_config(cfg)
    vitos = ViToSConfig.from_mapping(OmegaConf.to_container(cfg.vitos))
    # the reward loop (reasoning) and the driver (grounding) score with the same kwargs
    kwargs = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs)
    assert kwargs == vitos.reward_kwargs(cfg.data.min_pixels, cfg.data.max_pixels)
    # the pieces the trainer plugs into verl are importable by the names the config gives
    from verl.utils.import_utils import load_class_from_fqn, load_extern_object

    assert load_class_from_fqn(cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class, "AgentLoopManager")
    assert load_extern_object(cfg.data.custom_cls.path, cfg.data.custom_cls.name).__name__ == "ViToSDataset"
    assert callable(load_extern_object(cfg.reward.custom_reward_function.path, cfg.reward.custom_reward_function.name))
    files = list(cfg.data.train_files) + [cfg.data.val_files]
    assert all(str(f).startswith(str(tmp_path)) for f in files), files
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "vitos_pruned"
    assert not cfg.trainer.use_v1


@pytest.mark.parametrize("name", EVAL_RECIPES)
def test_eval_recipe_composes(name, monkeypatch, tmp_path):
    """Each evaluation recipe names known benchmarks whose converters exist, known methods, and
    the box rule of the training recipe it evaluates (margin_cells, box_format)."""
    import importlib

    from vitos_verl.eval.methods import METHODS
    from vitos_verl.eval.protocols import DATASETS
    from vitos_verl.platform.precision import register_resolver

    register_resolver()
    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    cfg = _compose(name, ["model.path=/models/x"])
    OmegaConf.resolve(cfg)
    assert set(cfg.methods) <= set(METHODS) and cfg.keep_ratio == "match"
    for bench, spec in cfg.benchmarks.items():
        assert bench in DATASETS and spec.src and spec.split
        assert callable(importlib.import_module(f"data_prep.{bench}").main)
    # the training recipe evaluated: eval_<name> -> <name> where it exists
    base = "smoke_cpu" if name == "eval_cpu" else name.removeprefix("eval_")
    trained = _compose(base if (RECIPES / f"{base}.yaml").exists() else "lingshu7b").vitos
    assert (cfg.vitos.margin_cells, cfg.vitos.box_format) == (trained.margin_cells, trained.box_format)
    if name != "eval_cpu":
        assert set(cfg.benchmarks) == set(DATASETS), "the GPU recipes evaluate all seven benchmarks"


def test_32b_recipes():
    """Lingshu-32B: 2 nodes x 8 GPUs, vLLM tensor parallel 4, the actor's states offloaded while vLLM
    runs, token budgets that hold one longest sequence; the header's estimate uses these values;
    the evaluation recipe leaves out fastv (a whole transformers copy on one GPU)."""
    cfg = _compose("lingshu32b")
    a = cfg.actor_rollout_ref
    gpus = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    tp = a.rollout.tensor_model_parallel_size
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, tp) == (2, 8, 4)
    assert gpus % tp == 0 and 40 % tp == 0 and 8 % tp == 0  # attention heads and KV heads of Qwen2.5-VL-32B
    assert a.actor.fsdp_config.param_offload and a.actor.fsdp_config.optimizer_offload
    assert a.ref.fsdp_config.model_dtype == "bf16" and a.actor.fsdp_config.model_dtype == "fp32"
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    for budget in (a.actor.ppo_max_token_len_per_gpu, a.ref.log_prob_max_token_len_per_gpu, a.rollout.log_prob_max_token_len_per_gpu):
        assert budget >= longest
    head = (RECIPES / "lingshu32b.yaml").read_text().split("\nhydra:")[0]
    assert f"tensor parallel {tp}" in head and f"gpu_memory_utilization {a.rollout.gpu_memory_utilization}" in head
    assert f"ppo_max_token_len_per_gpu = {a.actor.ppo_max_token_len_per_gpu}" in head and "G = 16 GPUs" in head
    # the 7B recipes' data, batch and method
    base = _compose("lingshu7b")
    assert OmegaConf.to_container(cfg.vitos) == OmegaConf.to_container(base.vitos)
    assert cfg.data == base.data and a.actor.ppo_mini_batch_size == base.actor_rollout_ref.actor.ppo_mini_batch_size
    ev = _compose("eval_lingshu32b", ["model.path=/models/x"])
    assert "fastv" not in ev.methods and ev.engine.tensor_parallel_size == 2 and ev.report.reference is None


def test_vitar16k_recipe_reads_the_converter_output(monkeypatch, tmp_path):
    """vitar16k_lingshu7b trains on what data_prep.vitar16k writes; the model's boxes are [0, 1]
    fractions, as the authors' (box_format norm1: the grounding prompt asks for them; the [0, 1]
    ground truth is converted to original pixels by the converter)."""
    from data_prep import vitar16k
    from vitos_verl.data.prompts import GroundingPrompt, render

    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    cfg = _compose("vitar16k_lingshu7b")
    OmegaConf.resolve(cfg)
    out = tmp_path / "data" / vitar16k.DATASET
    assert list(cfg.data.train_files) == [str(out / "train.parquet")] and cfg.data.val_files == str(out / "val.parquet")
    assert set(vitar16k.SPLITS) == {"train", "val"}
    assert cfg.vitos.box_format == cfg.data.box_format == "norm1"
    assert "normalised to [0, 1]" in render("grounding", "Where?", grounding=GroundingPrompt(cfg.vitos.box_format))
    base = _compose("lingshu7b")
    assert OmegaConf.to_container(cfg.vitos) == {**OmegaConf.to_container(base.vitos), "box_format": "norm1"}


def test_ablation_deltas():
    base = OmegaConf.to_container(_compose("lingshu7b").vitos)
    deltas = {"no_feedback": {"w_fb": 0.0}, "joint_loss": {"order": "joint"}, "no_prune": {"prune_mode": "none"},
              "crop": {"prune_mode": "crop"}, "lowres_grounding": {"grounding_max_pixels": 313600}}
    for name, delta in deltas.items():
        got = OmegaConf.to_container(_compose(f"ablation_{name}").vitos)
        assert {k: v for k, v in got.items() if base[k] != v} == delta, name


def test_smoke_recipe_paths_are_what_make_writes():
    """The smoke recipe reads the parquet data_prep writes and the model `make warmstart` exports."""
    mk = (ROOT / "Makefile").read_text()
    cfg = yaml.safe_load((RECIPES / "smoke_cpu.yaml").read_text())
    for f in cfg["data"]["train_files"] + [cfg["data"]["val_files"]]:
        rel = f.replace("${outputs_dir}/", "")
        ds, split = rel.split("/")[1], rel.split("/")[2].split(".")[0]
        assert f"data_prep.{ds}" in mk, ds
        assert split in ("train", "val", "test")
    warm = (ROOT / "scripts" / "warmstart_cpu.sh").read_text()
    assert cfg["actor_rollout_ref"]["model"]["path"] == "${outputs_dir}/models/tiny-qwen2.5-vl-sft"
    assert "DEST=$OUT/models/tiny-qwen2.5-vl-sft" in warm and "warmstart_cpu.sh" in mk
    # the warm start trains at the smoke recipe's pixel budget
    assert f"MAX_PIXELS=${{MAX_PIXELS:-{cfg['data']['max_pixels']}}}" in warm


def test_invalid_config_is_refused():
    from vitos_verl.trainer.main import check_config

    for bad, msg in [("vitos.n_g=3", "rollout.n"), ("trainer.use_v1=true", "use_v1"), ("vitos.order=both", "order"),
                     ("data.train_batch_size=3", "multiple")]:
        cfg = _compose("smoke_cpu", [bad] + (["actor_rollout_ref.rollout.n=2"] if "n_g" in bad else []))
        with pytest.raises(ValueError, match=msg):
            check_config(cfg, check_files=False)


# NNODES / GPUS_PER_NODE reach the config; the batch must split over the ranks (check_data_parallel):
# the smoke recipe's 2 questions do not on two ranks, so it runs as make two-node does
@pytest.mark.parametrize("recipe, nodes, gpus, args", [
    ("smoke_cpu", 2, 1, ["data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4"]),
    ("lingshu7b", 2, 4, []),
])
def test_launch_dry_run(recipe, nodes, gpus, args, tmp_path, monkeypatch):
    env = {**os.environ, "RECIPE": recipe, "DRY_RUN": "1", "NNODES": str(nodes), "GPUS_PER_NODE": str(gpus),
           "VITOS_OUTPUTS": str(tmp_path), "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    cfg = _compose(recipe)
    OmegaConf.resolve(cfg)
    _make_data_files(cfg)
    out = subprocess.run(["bash", str(ROOT / "launch" / "dualstream.sh"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = yaml.safe_load(out.stdout[out.stdout.index("actor_rollout_ref:"):]) if "actor_rollout_ref:" in out.stdout else None
    assert printed is not None, out.stdout[-2000:]
    assert printed["trainer"]["nnodes"] == nodes and printed["trainer"]["n_gpus_per_node"] == gpus
    assert printed["outputs_dir"] == str(tmp_path)


def test_launch_rejects_unknown_recipe(tmp_path):
    env = {**os.environ, "RECIPE": "nope", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "launch" / "dualstream.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "no recipe" in out.stderr


def test_cluster_manifests_parse():
    job = yaml.safe_load((ROOT / "launch" / "k8s" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"] == "bash launch/dualstream.sh"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert (RECIPES / f"{env['RECIPE']}.yaml").exists()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / "dualstream.sbatch")]).returncode == 0


@pytest.mark.parametrize("recipe,offline", [("smoke_cpu", "1"), ("qwen25vl3b_1node", "0")])
def test_launch_offline_only_when_asked(recipe, offline, tmp_path):
    """CPU recipes run offline (their model is local); GPU recipes reach the hub unless OFFLINE=1."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ADDRESS", "OFFLINE")}
    env.update(RECIPE=recipe, DRY_RUN="1", VITOS_OUTPUTS=str(tmp_path), PYTHON=sys.executable)
    for asked, want in ((None, offline), ("1", "1")):
        e = {**env, **({"OFFLINE": asked} if asked else {})}
        out = subprocess.run(["bash", str(ROOT / "launch" / "dualstream.sh"), "check_files=false"], env=e, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"offline={want}" in out.stdout, out.stdout[:500]


def test_slurm_script_dry_run(tmp_path):
    """The sbatch script on fake scontrol/srun: one `ray symmetric-run` per node, waiting for all of
    them, and the config the head would run composes (launch/dualstream.sh's dry run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\ngpu03\\ngpu04\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\necho 10.1.2.3\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="gpu[01-04]", SLURM_SUBMIT_DIR=str(ROOT), RECIPE="qwen25vl7b_1node",
               GPUS_PER_NODE="4", DRY_RUN="1", VITOS_OUTPUTS=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "dualstream.sbatch"), "check_files=false"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cmd = next(line for line in out.stdout.splitlines() if line.startswith("vitos: would run:"))
    assert "srun --nodes=4 --ntasks-per-node=1" in cmd
    assert "ray symmetric-run --address 10.1.2.3:6379 --min-nodes 4" in cmd and "--num-gpus=4" in cmd
    assert " -- env RAY_ADDRESS=10.1.2.3:6379 RECIPE=qwen25vl7b_1node NNODES=4 GPUS_PER_NODE=4" in cmd
    assert cmd.rstrip().endswith("bash launch/dualstream.sh check_files=false")
    printed = yaml.safe_load(out.stdout[out.stdout.index("actor_rollout_ref:"):])
    assert printed["trainer"]["nnodes"] == 4 and printed["trainer"]["n_gpus_per_node"] == 4


def test_one_gpu_recipe(monkeypatch):
    """gpu1_small: one GPU, the small random model by default, a checkpoint and a validation
    before the last step; its command at its top and in the README."""
    monkeypatch.delenv("MODEL_PATH", raising=False)
    cfg = _compose("gpu1_small")
    t = cfg.trainer
    assert (t.nnodes, t.n_gpus_per_node, cfg.actor_rollout_ref.rollout.tensor_model_parallel_size) == (1, 1, 1)
    assert str(cfg.actor_rollout_ref.model.path).endswith("/models/small-qwen2.5-vl")
    assert 0 < t.save_freq < t.total_training_steps and 0 < t.test_freq < t.total_training_steps
    assert t.total_training_steps % t.save_freq == 0 and "wandb" not in t.logger
    head = (RECIPES / "gpu1_small.yaml").read_text().split("\nhydra:")[0]
    assert "RECIPE=gpu1_small" in head and "vitos_verl.models.tiny --size small --out outputs/models/small-qwen2.5-vl" in head
    assert "`gpu1_small`" in (ROOT / "README.md").read_text()
