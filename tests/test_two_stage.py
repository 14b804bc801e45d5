"""The two-stage schedule: ``vitos.update_streams`` (which streams a run updates), the grounding
output's own answer (``vitos.w_acc``), the stage recipes, and the check that stage 2 starts from
stage 1's exported weights.

The trainer is driven through its real ``train_step`` with the Ray-side calls stubbed (the
rollouts, the actor's log-prob passes and update): a stream left out of ``update_streams`` must
still be generated, scored and logged, and get neither an old-log-prob/reference pass nor an update.
"""

from __future__ import annotations

import json
import shutil
import struct
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl import DataProto

from vitos_verl.pruning import image_geometry
from vitos_verl.rewards import compute_score, guard
from vitos_verl.rewards.score import SCORE_KEYS
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.dual_stream import last_token_scores, plan_reasoning, with_stream
from vitos_verl.trainer.optim_steps import LR_STEP_KEY
from vitos_verl.trainer.ray_trainer import ViToSRayTrainer
from vitos_verl.trainer.rollout_dump import GenerationDumps
from vitos_verl.trainer.streams import check_update_streams, update_stages

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
B, N_G, N_R, MB = 2, 2, 2, 2  # questions, boxes per question, answers per box, questions per mini-batch
P_LEN, R_LEN = 8, 6
SIZE, MAX_PIXELS = (280, 280), 78400  # 10 x 10 cells, not resized


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


# ------------------------------------------------------------------------------ config and stages
def test_update_streams_config():
    assert ViToSConfig().update_streams == ("grounding", "reasoning")
    assert ViToSConfig(update_streams=["reasoning", "grounding"]).update_streams == ("grounding", "reasoning")
    assert ViToSConfig(update_streams=["reasoning"]).stages() == (("reasoning",),)
    assert ViToSConfig(update_streams=["grounding"], order="reasoning_first").stages() == (("grounding",),)
    assert ViToSConfig(order="joint", update_streams=["reasoning"]).stages() == (("reasoning",),)
    assert ViToSConfig(order="reasoning_first").stages() == (("reasoning",), ("grounding",))
    for bad, match in (([], "empty"), (["answers"], "unknown stream"), ("grounding", "must be a list"), (None, "must be a list")):
        with pytest.raises(ValueError, match=match):
            ViToSConfig(update_streams=bad)
    with pytest.raises(ValueError, match="update_streams"):
        ViToSConfig.from_mapping({"update_streams": ["grounding", "answer"]})
    # only the updated streams' optimiser steps; joint with one stream: that stream's count
    assert ViToSConfig(update_streams=["grounding"]).update_optim_steps(128, 32) == {"grounding": 4}
    cfg = ViToSConfig(order="joint", update_streams=["reasoning"], optim_steps={"grounding": 2, "reasoning": 8})
    assert cfg.update_optim_steps(128, 32) == {"reasoning": 8}
    assert update_stages("grounding_first") == (("grounding",), ("reasoning",))  # the default: both
    assert check_update_streams(("grounding", "grounding")) == ("grounding",)


def test_w_acc_config():
    assert ViToSConfig().w_acc == 0.0 and not ViToSConfig().grounding_answer
    assert ViToSConfig(w_acc=1).grounding_answer and ViToSConfig(w_acc=1).reward_kwargs(3136, 78400)["w_acc"] == 1.0
    for bad in (-0.5, float("nan"), "high"):
        with pytest.raises(ValueError, match="w_acc"):
            ViToSConfig(w_acc=bad)


@pytest.mark.parametrize("streams", ["[grounding]", "[reasoning]", "[reasoning,grounding]"])
def test_smoke_composition_with_update_streams_passes_the_checks(streams, monkeypatch, tmp_path):
    from vitos_verl.trainer.checks import check_config

    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    cfg = _compose("smoke_cpu", f"vitos.update_streams={streams}", "vitos.w_acc=1.0")
    OmegaConf.resolve(cfg)
    check_config(cfg, check_files=False)
    bad = _compose("smoke_cpu", "vitos.update_streams=[]")
    OmegaConf.resolve(bad)
    with pytest.raises(ValueError, match="update_streams is empty"):
        check_config(bad, check_files=False)


# ------------------------------------------------------------------------------ the grounding output's own answer
GT = [[28.0, 28.0, 140.0, 140.0]]
INFO = {"stream": "grounding", "image_size": list(SIZE), "gt_boxes": GT, "answer_type": "OPEN", "feedback_acc": 0.5}


def test_w_acc_scores_the_grounding_answer():
    kw = {"max_pixels": MAX_PIXELS}
    with_answer = "<think>the liver is on the left</think><box>[28, 28, 140, 140]</box><answer>Liver</answer>"
    box_only = "<box>[28, 28, 140, 140]</box>"
    wrong = with_answer.replace("Liver", "spleen")
    base = compute_score("slake", box_only, "liver", INFO, **kw)
    # w_acc = 0 (the default): the reward as before, a box-only output is the template
    assert base["score"] == pytest.approx(1.0 + 0.5 + 0.5) and base["format"] == 1.0 and base["answer_acc"] == 0.0
    s0 = compute_score("slake", with_answer, "liver", INFO, **kw)
    assert s0["answer_acc"] == 1.0 and s0["format"] == 0.0  # the answer is reported; not asked for: off-template
    assert s0["score"] == pytest.approx(base["score"] - 0.5)
    # w_acc > 0: the answer's accuracy enters the score and the format needs the answer
    s1 = compute_score("slake", with_answer, "liver", INFO, w_acc=2.0, **kw)
    assert s1["format"] == 1.0 and s1["answer_acc"] == 1.0 and s1["score"] == pytest.approx(1.0 + 0.5 + 0.5 + 2.0)
    s_wrong = compute_score("slake", wrong, "liver", INFO, w_acc=2.0, **kw)
    assert s_wrong["answer_acc"] == 0.0 and s_wrong["format"] == 1.0 and s1["score"] - s_wrong["score"] == pytest.approx(2.0)
    s_none = compute_score("slake", box_only, "liver", INFO, w_acc=2.0, **kw)
    assert s_none["format"] == 0.0 and s_none["answer_acc"] == 0.0 and s_none["iou"] == 1.0
    # the answer earns without a box too (the box terms do not)
    no_box = compute_score("slake", "<think>it is the liver</think><answer>liver</answer>", "liver", INFO, w_acc=1.0, **kw)
    # (no feedback for the missing box: unparsed_box no_feedback, the default)
    assert no_box["parsed"] == 0.0 and no_box["answer_acc"] == 1.0 and no_box["score"] == pytest.approx(1.0)
    # options and closed questions as the reasoning answer is scored
    choice = {**INFO, "answer_type": "CHOICE", "options": [{"letter": "A", "content": "Liver"}, {"letter": "B", "content": "Lung"}]}
    assert compute_score("slake", box_only + "<answer>B</answer>", "B", choice, w_acc=1.0, **kw)["answer_acc"] == 1.0
    # empty or nested answers are no answer; garbage never raises
    for bad in (box_only + "<answer>  </answer>", box_only + "<answer><answer>x</answer>", "<answer>" * 500, ""):
        out = compute_score("slake", bad, "liver", INFO, w_acc=1.0, **kw)
        assert out["format"] == 0.0 and set(out) == set(SCORE_KEYS)
    # the reasoning stream reports its own accuracy as answer_acc too
    r = compute_score("slake", "<think>.</think><answer>liver</answer>", "liver", {"stream": "reasoning"})
    assert r["answer_acc"] == r["acc"] == 1.0


def test_w_acc_reaches_the_driver_side_grounding_reward():
    """The grounding rewards the driver computes (with cross-feedback) carry the answer term."""
    from vitos_verl.trainer.dual_stream import grounding_rewards

    texts = ["<think>the left lobe</think><box>[28, 28, 140, 140]</box><answer>liver</answer>",
             "<think>the left lobe</think><box>[28, 28, 140, 140]</box><answer>lung</answer>"]  # fmt: skip
    kw = ViToSConfig(w_acc=1.0).reward_kwargs(3136, MAX_PIXELS)
    out = grounding_rewards(["slake"] * 2, texts, ["liver"] * 2, [INFO] * 2, [1.0, 1.0], [0, 1], kw)
    assert out["answer_acc"].tolist() == [1.0, 0.0] and out["score"][0] - out["score"][1] == pytest.approx(1.0)
    assert out["feedback"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------ the trainer skips what it does not update
def _step(cfg: ViToSConfig, w_acc_text: bool):
    """One step's rollouts as two_pass returns them: B questions, N_G boxes each (the evidence box,
    then a corner), N_R answers per box (right, then wrong), and the reasoning plan."""
    geom = image_geometry(*SIZE, min_pixels=3136, max_pixels=MAX_PIXELS)
    answer = "<answer>liver</answer>" if w_acc_text else ""
    texts = [f"<think>the left lobe</think><box>{b}</box>{answer}" for _ in range(B) for b in ("[28, 28, 140, 140]", "[0, 0, 56, 56]")]
    plan = plan_reasoning(texts, [list(geom.grid_thw)] * len(texts), [SIZE] * len(texts), [[]] * len(texts), cfg)
    rows = np.repeat(np.arange(B), N_G)
    info = [{"image_size": list(SIZE), "gt_boxes": GT, "answer_type": "OPEN", "resized_size": list(SIZE)}] * B
    r_texts = ["<think>look</think><answer>liver</answer>", "<think>look</think><answer>lung</answer>"] * (B * N_G)

    def batch(n, uids, stream, extra):
        ids = torch.randint(10, 100, (n, P_LEN + R_LEN))
        tensors = {"prompts": ids[:, :P_LEN], "responses": ids[:, P_LEN:], "input_ids": ids,
                   "attention_mask": torch.ones(n, P_LEN + R_LEN, dtype=torch.long),
                   "position_ids": torch.arange(P_LEN + R_LEN).repeat(n, 1), "response_mask": torch.ones(n, R_LEN, dtype=torch.long)}
        nt = {"uid": np.array(uids, dtype=object), "data_source": np.array(["slake"] * n, dtype=object),
              "reward_model": np.array([{"ground_truth": "liver"}] * n, dtype=object),
              "extra_info": with_stream([info[0]] * n, stream), "multi_modal_inputs": np.array([{}] * n, dtype=object), **extra}
        return DataProto.from_dict(tensors=tensors, non_tensors=nt)  # fmt: skip

    g = batch(B * N_G, [f"q{q}" for q in rows], "grounding", {"box_index": np.arange(B * N_G)})
    r_info = [{**info[0], "stream": "reasoning", "keep_ratio": float(k)} for k in plan.keep_ratio]
    r_scores = [compute_score("slake", t, "liver", e) for t, e in zip(r_texts, r_info)]
    r = batch(len(plan.box_index), [f"q{q}" for q in rows[plan.box_index]], "reasoning",
              {"box_index": plan.box_index, **{k: np.array([s[k] for s in r_scores]) for k in SCORE_KEYS}})
    r.batch["rm_scores"] = last_token_scores([s["score"] for s in r_scores], r.batch["response_mask"])
    return g, r, plan


def _trainer(*overrides: str):
    cfg = _compose("smoke_cpu", f"data.train_batch_size={B}", f"actor_rollout_ref.actor.ppo_mini_batch_size={MB}",
                   f"vitos.n_g={N_G}", f"vitos.n_r={N_R}", "trainer.balance_batch=false", *overrides)  # fmt: skip
    t = object.__new__(ViToSRayTrainer)
    t.config = cfg
    t.vitos = ViToSConfig.from_mapping(OmegaConf.to_container(cfg.vitos))
    t.stages = t.vitos.stages()  # as __init__ sets them
    t.update_steps = t.vitos.update_optim_steps(B, MB)
    t.use_reference_policy = True
    t.reward_fn = guard.guard_reward_fn(partial(compute_score, **t.vitos.reward_kwargs(3136, MAX_PIXELS)), 10.0)
    t.dumps = GenerationDumps(None, None, 0, {}, None, 3136, MAX_PIXELS)
    t.global_steps = 1
    t.checkpoint_manager = SimpleNamespace(sleep_replicas=lambda: None, update_weights=lambda step: None)
    t.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    calls = SimpleNamespace(old=[], ref=[], update=[])

    def stream_of(b) -> str:
        return "+".join(sorted({e["stream"] for e in b.non_tensor_batch["extra_info"]}))

    def old_log_prob(b):
        calls.old.append(stream_of(b))
        n = len(b)
        return DataProto.from_dict(tensors={"old_log_probs": -torch.ones(n, R_LEN), "entropys": torch.ones(n, R_LEN)}), 0.1

    def ref_log_prob(b):
        calls.ref.append(stream_of(b))
        return DataProto.from_dict(tensors={"ref_log_prob": -torch.ones(len(b), R_LEN)})

    def update_actor(b):
        assert "old_log_probs" in b.batch.keys() and "advantages" in b.batch.keys()
        calls.update.append((stream_of(b), len(b), b.meta_info[LR_STEP_KEY]))
        return DataProto(meta_info={"metrics": {"actor/grad_norm": [1.0], "actor/pg_loss": [0.1]}})

    t._compute_old_log_prob, t._compute_ref_log_prob, t._update_actor = old_log_prob, ref_log_prob, update_actor
    step = _step(t.vitos, t.vitos.w_acc > 0)
    t.two_pass = lambda batch, timing, n_g, n_r, validate=False: step
    return t, calls


@pytest.mark.parametrize(
    ("overrides", "updated"),
    [
        ((), ("grounding", "reasoning")),
        (("vitos.update_streams=[grounding]", "vitos.w_acc=1.0"), ("grounding",)),
        (("vitos.update_streams=[reasoning]",), ("reasoning",)),
        (("vitos.update_streams=[reasoning]", "vitos.order=joint"), ("reasoning",)),
        (("vitos.order=reasoning_first",), ("reasoning", "grounding")),
    ],
)
def test_train_step_updates_only_the_listed_streams(overrides, updated):
    t, calls = _trainer(*overrides)
    metrics = t.train_step({"dummy": np.zeros(B)})
    sizes = {"grounding": B * N_G, "reasoning": B * N_G * N_R}
    # each listed stream: old log-probs, reference, one update, in the configured order; the last update steps the LR
    assert calls.old == calls.ref == sorted(updated, key=("grounding", "reasoning").index)
    assert calls.update == [(s, sizes[s], k == len(updated) - 1) for k, s in enumerate(updated)]
    for s in ("grounding", "reasoning"):
        # both streams generated, scored and logged, whatever is updated
        assert metrics[f"{s}/reward/score"] > 0 and f"{s}/critic/advantages/mean" in metrics
        assert metrics[f"{s}/updated"] == float(s in updated)
        assert (f"actor/{s}/optim_steps" in metrics) == (s in updated) and (f"{s}/entropy" in metrics) == (s in updated)
        assert (f"{s}/timing_s/old_log_prob" in metrics) == (s in updated)
    assert metrics["grounding/reward/feedback"] == pytest.approx(0.5)  # cross-feedback with or without its update
    assert metrics["grounding/reward/answer_acc"] == (1.0 if "vitos.w_acc=1.0" in overrides else 0.0)


def test_stage_one_run_rewards_the_grounding_answer():
    t, _ = _trainer("vitos.update_streams=[grounding]", "vitos.w_acc=1.0")
    metrics = t.train_step({"dummy": np.zeros(B)})
    # evidence box (IoU 1) and a corner box; every grounding output answers "liver", right
    assert metrics["grounding/reward/format"] == 1.0 and metrics["grounding/reward/answer_acc"] == 1.0
    plain, _ = _trainer("vitos.update_streams=[grounding]")
    assert metrics["grounding/reward/score"] - plain.train_step({"dummy": np.zeros(B)})["grounding/reward/score"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ the stage recipes
def test_stage_recipes_map_the_two_stages(monkeypatch, tmp_path):
    from vitos_verl.trainer.stages import stage1_export

    monkeypatch.setenv("VITOS_OUTPUTS", str(tmp_path))
    monkeypatch.delenv("STAGE1_EXPORT", raising=False)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    s1, s2, one = (_compose(n) for n in ("lingshu7b_stage1", "lingshu7b_stage2", "lingshu7b"))
    for c in (s1, s2, one):
        OmegaConf.resolve(c)
    v1, v2 = ViToSConfig.from_mapping(OmegaConf.to_container(s1.vitos)), ViToSConfig.from_mapping(OmegaConf.to_container(s2.vitos))
    assert v1.update_streams == ("grounding",) and v1.w_acc > 0 and v1.box_format == "norm1"
    assert v2.update_streams == ("reasoning",)
    # stage 2 asks the grounding stream what stage 1 trained it on
    assert (v2.box_format, v2.grounding_answer) == (v1.box_format, v1.grounding_answer)
    assert s1.data.box_format == s2.data.box_format == "norm1" and s1.data.w_acc == s2.data.w_acc
    # stage 1 starts from the backbone; stage 2 from stage 1's export, in its own run folder
    assert s1.actor_rollout_ref.model.path == one.actor_rollout_ref.model.path
    run1 = Path(s1.trainer.default_local_dir).parent
    assert s2.actor_rollout_ref.model.path == str(stage1_export(run1)) == str(tmp_path / "runs" / "lingshu7b_stage1" / "export")
    assert Path(s2.trainer.default_local_dir).parent != run1 and s1.trainer.experiment_name != s2.trainer.experiment_name
    # everything else as the one-stage recipe
    for c in (s1, s2):
        assert c.data.train_files == one.data.train_files and c.actor_rollout_ref.actor.optim.lr == one.actor_rollout_ref.actor.optim.lr
        delta = {k for k, v in OmegaConf.to_container(c.vitos).items() if v != OmegaConf.to_container(one.vitos)[k]}
        assert delta == {"box_format", "w_acc", "update_streams"}
    head = (RECIPES / "lingshu7b_stage1.yaml").read_text().split("\nhydra:")[0]
    assert "README" in head and "Unknown" in head and "update_streams: [grounding]" in head


# ------------------------------------------------------------------------------ stage 2 starts from stage 1's weights
def _stage1_run(root: Path, tiny_ckpt: Path, step: int = 2) -> Path:
    """A stage-1 run folder as the trainer and the export leave it: ckpt/global_step_N/actor and
    export/ (the tiny checkpoint's weights, stamped with the checkpoint it was merged from)."""
    run = root / "runs" / "s1"
    actor = run / "ckpt" / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"w")
    (run / "ckpt" / "latest_checkpointed_iteration.txt").write_text(str(step))
    shutil.copytree(tiny_ckpt, run / "export")
    (run / "export" / "vitos_export.json").write_text(json.dumps({"source": str(actor.resolve())}))
    return run


def _edit_one_tensor(model_dir: Path) -> None:
    """Flip the first byte of the first tensor of the first safetensors file (the weights change)."""
    f = sorted(model_dir.glob("*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n] ^= 0xFF
    f.write_bytes(bytes(data))


def test_stage_two_starts_from_stage_one_export(tiny_ckpt, tmp_path):
    from vitos_verl.export import weights_digest
    from vitos_verl.trainer.stages import START_RECORD, StageError, check_stage_start, main, record_start

    run1 = _stage1_run(tmp_path, tiny_ckpt)
    run2 = tmp_path / "runs" / "s2"
    assert record_start(run2, str(run1 / "export"), step=0) == run2 / START_RECORD
    assert record_start(run2, "/elsewhere", step=0) is None and record_start(tmp_path / "r3", "/x", step=4) is None
    rec = json.loads((run2 / START_RECORD).read_text())
    assert rec["model_path_resolved"] == str((run1 / "export").resolve()) and rec["export"]["source"].endswith("global_step_2/actor")
    out = check_stage_start(run1, run2)
    # the weights stage 2 loads (the safetensors under its model path) are the export's, tensor for tensor
    assert out["weights_digest"] == weights_digest(rec["model_path_resolved"]) == weights_digest(tiny_ckpt)
    assert main(["check", str(run1), str(run2)]) == 0
    # a copy elsewhere with the same weights is the same start; other weights are not
    copy = tmp_path / "copy"
    shutil.copytree(run1 / "export", copy)
    (run2 / START_RECORD).unlink()
    record_start(run2, str(copy), 0)
    assert check_stage_start(run1, run2)["weights_digest"] == out["weights_digest"]
    _edit_one_tensor(copy)
    with pytest.raises(StageError, match="weights differ"):
        check_stage_start(run1, run2)
    assert main(["check", str(run1), str(run2)]) == 1
    # an export of an older checkpoint than stage 1's last is stale
    (run1 / "ckpt" / "global_step_3" / "actor" / "huggingface").mkdir(parents=True)
    (run1 / "ckpt" / "global_step_3" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"w")
    (run1 / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(StageError, match="not from stage 1's last checkpoint"):
        check_stage_start(run1, run2)
    with pytest.raises(StageError, match="missing"):
        check_stage_start(run1, tmp_path / "never-ran")


def test_weights_digest_ignores_sharding(tmp_path):
    from vitos_verl.export import ExportError, weights_digest

    def write(path: Path, tensors: dict[str, bytes], meta: dict | None = None) -> None:
        header, offset = {}, 0
        for name, data in tensors.items():
            header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
        if meta:
            header["__metadata__"] = meta
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write(one / "model.safetensors", {"a": b"\x01\x02", "b": b"\x03"})
    write(two / "model-00001-of-00002.safetensors", {"b": b"\x03"}, {"format": "pt"})
    write(two / "model-00002-of-00002.safetensors", {"a": b"\x01\x02"})
    assert weights_digest(one) == weights_digest(two)
    write(two / "model-00002-of-00002.safetensors", {"a": b"\x01\x09"})
    assert weights_digest(one) != weights_digest(two)
    with pytest.raises(ExportError, match="no \\*.safetensors"):
        weights_digest(tmp_path)


def test_make_two_stage_target():
    make = (ROOT / "Makefile").read_text()
    assert "two-stage: warmstart" in make and "scripts/two_stage_cpu.sh" in make
    script = (ROOT / "scripts" / "two_stage_cpu.sh").read_text()
    for piece in ("vitos.update_streams=[grounding]", "vitos.update_streams=[reasoning]", "vitos_verl.export",
                  "actor_rollout_ref.model.path=$RUN1/export", "vitos_verl.trainer.stages check"):  # fmt: skip
        assert piece in script, piece
