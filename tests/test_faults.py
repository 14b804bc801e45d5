"""Faults: a failed rollout or reward is a counted, zero-advantage sample and the step goes on; a
checkpoint save interrupted at any point resumes from the previous complete step; a broken
resume tracker is an error that names it.

The agent-loop test runs verl 0.9.1's own ``AgentLoopWorker.generate_sequences`` (our worker
subclass, built from the composed smoke recipe) on real SLAKE rows with the tiny checkpoint's
processor, a fake LLM server in place of vLLM, and verl's real ``RewardLoopWorker`` (as a plain
object, not a Ray actor) scoring through our guarded reward entry.
"""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import vitos_verl.rewards.guard as guard
from vitos_verl.records import ERROR_KEY, FAILED_KEY, FAULT_KEY
from vitos_verl.rewards.score import SCORE_KEYS, compute_score
from vitos_verl.trainer import checkpoint as ckpt
from vitos_verl.trainer.dual_stream import grounding_rewards, sample_grids, stream_metrics, with_stream
from vitos_verl.trainer.faults import check_not_all_failed, failed_mask, fault_metrics

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 78400  # the smoke recipe's budget
REPLY = "<box>[10, 10, 60, 60]</box>"


def _slow_compute_score(seconds: float):
    """compute_score that hangs on responses containing HANG and raises on BOOM."""

    def fn(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        if "HANG" in solution_str:
            time.sleep(seconds)
        if "BOOM" in solution_str:
            raise KeyError("boom")
        return compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)

    return fn


# ------------------------------------------------------------------ reward time limit
def test_call_with_timeout():
    assert guard.call_with_timeout(lambda: 3, 1.0) == 3
    with pytest.raises(KeyError):
        guard.call_with_timeout(lambda: {}["x"], 1.0)
    t = time.monotonic()
    with pytest.raises(guard.RewardTimeout, match="0.2 s"):
        guard.call_with_timeout(lambda: time.sleep(3), 0.2)
    assert time.monotonic() - t < 1.5
    with pytest.raises(ValueError):
        guard.call_with_timeout(lambda: 1, 0)


def test_reward_past_time_limit_scores_zero_and_is_counted(monkeypatch):
    info = {"stream": "reasoning", "answer_type": "CLOSED"}
    ok = guard.guarded_compute_score("slake", "<think>x</think><answer>yes</answer>", "yes", info, reward_timeout_s=5)
    assert ok == {**compute_score("slake", "<think>x</think><answer>yes</answer>", "yes", info), "reward_timeout": 0.0, "reward_error": 0.0}
    assert ok["score"] > 1
    monkeypatch.setattr(guard, "compute_score", _slow_compute_score(3.0))
    t = time.monotonic()
    slow = guard.guarded_compute_score("slake", "<answer>yes</answer> HANG", "yes", info, reward_timeout_s=0.3)
    assert time.monotonic() - t < 2.0
    assert slow == guard.failed_scores(timeout=True) and slow["score"] == 0.0 and slow["reward_timeout"] == 1.0
    bad = guard.guarded_compute_score("slake", "BOOM", "yes", info, reward_timeout_s=1)
    assert bad["reward_error"] == 1.0 and bad["score"] == 0.0 and set(bad) == set(guard.GUARDED_KEYS)
    with pytest.raises(ValueError, match="reward_timeout_s"):
        guard.guarded_compute_score("slake", "x", "yes", info, reward_timeout_s=0)

    # the driver-side grounding reward: one hanging call scores 0, is flagged, the rest are intact
    extra = [{"image_size": [512, 512], "gt_boxes": [[100, 100, 300, 300]]}] * 3
    texts = ["<box>[100, 100, 300, 300]</box>", "<box>[100, 100, 300, 300]</box> HANG", "<box>[0, 0, 50, 50]</box>"]
    kw = {"w_fb": 1.0, "reward_timeout_s": 0.3}
    t = time.monotonic()
    out = grounding_rewards(["slake"] * 3, texts, ["x"] * 3, extra, [1.0, 1.0, 0.0], [0, 1, 2], kw)
    assert time.monotonic() - t < 3.0
    assert out["reward_timeout"].tolist() == [0.0, 1.0, 0.0] and out["reward_error"].tolist() == [0.0] * 3
    direct = compute_score("slake", texts[0], "x", {**extra[0], "stream": "grounding", "feedback_acc": 1.0}, w_fb=1.0)
    assert out["score"][1] == 0.0 and out["score"][0] == pytest.approx(direct["score"]) and direct["score"] > 2
    assert out["iou"][2] == 0.0 and out["feedback"][2] == 0.0
    nt = {"reward_timeout": out["reward_timeout"], "reward_error": out["reward_error"]}
    assert failed_mask(nt, 3).tolist() == [False, True, False]
    assert fault_metrics("grounding", nt, 3) == {
        "grounding/failed/rollout": 0.0, "grounding/failed/reward_error": 0.0,
        "grounding/failed/reward_timeout": 1.0, "grounding/failed/total": 1.0,
    }


# ------------------------------------------------------------------ agent loop worker
@pytest.fixture(scope="module")
def cfg(tiny_ckpt, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    os.environ["VITOS_OUTPUTS"] = str(tmp_path_factory.mktemp("outputs"))
    overrides = [f"actor_rollout_ref.model.path={tiny_ckpt}", "data.max_prompt_length=1024", "data.max_response_length=32",
                 "vitos.reward_timeout_s=0.5"]
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        c = compose(config_name="smoke_cpu", overrides=overrides)
    OmegaConf.resolve(c)
    return c


@pytest.fixture(scope="module")
def rows(slake_dataset):
    ds = slake_dataset(MAX_PIXELS)
    return [ds[i] for i in range(0, 250, 50)]


def _with_text(chat, marker: str):
    chat = copy.copy(list(chat))
    msg = dict(chat[-1])
    msg["content"] = [dict(p, text=p["text"] + marker) if p.get("type") == "text" else p for p in msg["content"]]
    chat[-1] = msg
    return chat


class _FakeServer:
    """vLLM's place: answers REPLY, HANG (the reward hangs) or raises, by a marker in the prompt."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    async def generate(self, *, prompt_ids, sampling_params, **_):
        from verl.workers.rollout.replica import TokenOutput

        text = self.tok.decode(prompt_ids)
        if "FAIL_ROLLOUT" in text:
            raise RuntimeError("vLLM server died")
        reply = "HANG " + REPLY if "HANG_REWARD" in text else REPLY
        return TokenOutput(token_ids=self.tok.encode(reply) + [self.tok.eos_token_id])


def test_agent_loop_worker_turns_a_failed_sample_into_a_counted_placeholder(cfg, rows, monkeypatch):
    """Five samples through verl's generate_sequences: 0 fine; 1 the rollout raises; 2 its reward
    runs past the limit; 3 the reward loop call raises; 4 a malformed keep mask (even its
    placeholder prompt fails: text-only placeholder). One batch comes back, 0 is intact."""
    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from vitos_verl.pruning import KEEP_FIELD as KEEP_KEY
    from vitos_verl.rollout.agent_loop import AGENT_NAME, ViToSAgentLoopWorker

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # verl's loops and reward manager take the current loop
    monkeypatch.setattr(guard, "compute_score", _slow_compute_score(5.0))
    worker = ViToSAgentLoopWorker(cfg, llm_client=None)
    worker.llm_client = _FakeServer(worker.tokenizer)
    reward = RewardLoopWorker(cfg)  # verl's, loading our guarded entry from the config

    async def score(data):
        if data.non_tensor_batch["extra_info"][0].get("explode"):
            raise RuntimeError("reward actor died")
        return await reward.compute_score(data)

    worker.reward_loop_worker_handles = [SimpleNamespace(compute_score=SimpleNamespace(remote=score))]

    n = len(rows)
    chats = [r["raw_prompt"] for r in rows]
    chats[1], chats[2] = _with_text(chats[1], " FAIL_ROLLOUT"), _with_text(chats[2], " HANG_REWARD")
    extra = with_stream([r["extra_info"] for r in rows], "grounding")
    extra[3] = {**extra[3], "explode": True}
    raw = np.empty(n, dtype=object)
    raw[:] = chats
    batch = DataProto.from_dict(
        tensors={"dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8)},
        non_tensors={
            "raw_prompt": raw, "agent_name": np.array([AGENT_NAME] * n, dtype=object),
            "vitos_keep": np.array(["", "", "", "", "2x2:zz"], dtype=object), "index": np.arange(n),
            "data_source": np.array([r["data_source"] for r in rows], dtype=object),
            "reward_model": np.array([r["reward_model"] for r in rows], dtype=object), "extra_info": extra,
        },
        meta_info={"global_steps": 7, "validate": False},
    )
    t = time.monotonic()
    out = loop.run_until_complete(worker.generate_sequences(batch))
    assert time.monotonic() - t < 60
    nt = out.non_tensor_batch
    assert len(out) == n
    assert [int(v) for v in nt[FAILED_KEY]] == [0, 1, 0, 1, 1]
    assert list(nt[FAULT_KEY]) == ["", "rollout", "", "reward", "rollout"]
    assert "RuntimeError: vLLM server died" in nt[ERROR_KEY][1] and "reward actor died" in nt[ERROR_KEY][3]
    assert "malformed keep mask" in nt[ERROR_KEY][4] and nt[ERROR_KEY][0] == ""
    assert nt["reward_timeout"].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    kinds = fault_metrics("grounding", nt, n)
    assert (kinds["grounding/failed/rollout"], kinds["grounding/failed/reward_error"], kinds["grounding/failed/reward_timeout"],
            kinds["grounding/failed/total"]) == (2.0, 1.0, 1.0, 4.0)
    assert failed_mask(nt, n).tolist() == [False, True, True, True, True]

    # sample 0 is intact: its response, its reward from the real reward loop
    resp_mask = out.batch["response_mask"]
    reply_ids = worker.tokenizer.encode(REPLY) + [worker.tokenizer.eos_token_id]
    assert out.batch["responses"][0, : len(reply_ids)].tolist() == reply_ids
    assert int(resp_mask[0].sum()) == len(reply_ids)
    kw = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs)
    kw.pop("reward_timeout_s")
    expected = compute_score(rows[0]["data_source"], REPLY, rows[0]["reward_model"]["ground_truth"], extra[0], **kw)
    assert float(out.batch["rm_scores"][0].sum()) == pytest.approx(expected["score"], abs=1e-5)
    assert nt["score"][0] == pytest.approx(expected["score"]) and set(SCORE_KEYS) <= set(nt)
    # placeholders: no trained token, reward 0, still well-formed
    assert resp_mask[[1, 3, 4]].sum() == 0 and out.batch["rm_scores"][[1, 2, 3, 4]].abs().sum() == 0
    mm = nt["multi_modal_inputs"]
    assert mm[1]["image_grid_thw"].shape == (1, 3) and bool(mm[1][KEEP_KEY].all())
    assert KEEP_KEY in mm[1] and "image_grid_thw" not in mm[4]  # 1 keeps its prompt and image; 4 is text-only
    prompt_len = out.batch["prompts"].shape[1]
    assert int(out.batch["attention_mask"][1, :prompt_len].sum()) > 100 and int(out.batch["attention_mask"][4, :prompt_len].sum()) == 1
    assert out.batch["position_ids"].shape == (n, 4, out.batch["input_ids"].shape[1])
    # the prune step can plan every sample, the text-only one from its image size
    grids = sample_grids(mm, [r["extra_info"]["image_size"] for r in rows], 3136, MAX_PIXELS)
    assert grids[0] == mm[0]["image_grid_thw"][0].tolist() and len(grids[4]) == 3 and grids[4][1] * grids[4][2] > 0
    loop.close()


# ------------------------------------------------------------------ trainer: zero advantage, metrics
def _trainer(n: int):
    from vitos_verl.trainer.config import ViToSConfig
    from vitos_verl.trainer.ray_trainer import ViToSRayTrainer

    t = object.__new__(ViToSRayTrainer)
    t.config = OmegaConf.create({
        "algorithm": {"adv_estimator": "grpo", "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True},
        "actor_rollout_ref": {"actor": {"loss_agg_mode": "token-mean"}, "rollout": {"n": n}},
    })
    t.use_reference_policy = False
    t.vitos = ViToSConfig()  # the method's defaults, as ViToSRayTrainer.__init__ sets them
    return t


def test_failed_samples_get_zero_advantage():
    """Two questions x 4 samples through the trainer's log-prob/advantage stage (verl's GRPO):
    failed samples get zero advantage and response mask, and leave their group's statistics."""
    from verl import DataProto
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.0])
    n, T = 8, 5
    mask = torch.ones(n, T, dtype=torch.long)
    mask[:, 3:] = 0
    rewards = torch.zeros(n, T)
    rewards[:, 2] = scores
    uid = np.array(["q0"] * 4 + ["q1"] * 4, dtype=object)
    nt = {
        "uid": uid.copy(),
        FAILED_KEY: np.array([0, 1, 0, 0, 0, 0, 0, 0], dtype=object),  # sample 1: its rollout failed
        FAULT_KEY: np.array(["", "rollout", "", "", "", "", "", ""], dtype=object),
        "reward_timeout": np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=np.float64),  # sample 6: reward timed out
    }
    b = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask.clone()}, non_tensors=nt)
    trainer = _trainer(4)
    trainer._compute_old_log_prob = lambda data: (
        DataProto.from_dict(tensors={"old_log_probs": torch.zeros(len(data), T), "entropys": torch.ones(len(data), T)}), 0.0
    )
    metrics: dict = {}
    out = trainer._log_probs_and_advantages(b, metrics, "reasoning", {})
    adv = out.batch["advantages"]
    failed = [1, 6]
    assert adv[failed].abs().sum() == 0 and out.batch["response_mask"][failed].sum() == 0
    assert out.batch["response_mask"][[0, 2, 3, 4, 5, 7]].sum() == 6 * 3
    assert out.non_tensor_batch["uid"].tolist() == uid.tolist()  # restored after GRPO
    # the others: GRPO within their group without the failed samples
    for idx in ([0, 2, 3], [4, 5, 7]):
        ref, _ = compute_grpo_outcome_advantage(rewards[idx], mask[idx], np.array(["g"] * len(idx), dtype=object))
        assert torch.allclose(adv[idx], ref, atol=1e-5)
    assert float(adv[0, 0]) > 0 > float(adv[2, 0])

    # metrics leave them out of the reward means, count them, and a stream of failures stops the run
    sm = stream_metrics("reasoning", {"score": scores.numpy()}, uid, [10] * n, [3] * n, failed=failed_mask(nt, n))
    assert sm["reasoning/reward/score"] == pytest.approx(float(scores[[0, 2, 3, 4, 5, 7]].mean()))
    fm = fault_metrics("reasoning", nt, n)
    assert fm["reasoning/failed/total"] == 2.0 and fm["reasoning/failed/rollout"] == 1.0 and fm["reasoning/failed/reward_timeout"] == 1.0
    check_not_all_failed("reasoning", nt, n)
    all_failed = {**nt, FAILED_KEY: np.ones(n, dtype=object), ERROR_KEY: np.array(["RuntimeError: x"] * n, dtype=object)}
    with pytest.raises(RuntimeError, match="all 8 reasoning samples.*RuntimeError: x"):
        check_not_all_failed("reasoning", all_failed, n)


def test_malformed_samples_leave_the_loss_but_not_their_group():
    """vitos.mask_malformed, through the trainer's advantage stage (verl's GRPO): a sample with
    format 0 keeps its reward in its group (the well-formed samples' advantages are GRPO's over all
    four) but gets zero advantage and response mask; off (the default), nothing changes."""
    from dataclasses import replace

    from verl import DataProto
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    scores = torch.tensor([2.0, 0.8, -1.0, 0.5, 1.0, 1.0, 1.0, -1.0])
    fmt = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 0.0])
    n, T = 8, 4
    mask = torch.ones(n, T, dtype=torch.long)
    rewards = torch.zeros(n, T)
    rewards[:, -1] = scores
    uid = np.array(["q0"] * 4 + ["q1"] * 4, dtype=object)
    ref, _ = compute_grpo_outcome_advantage(rewards, mask, uid)
    for on in (False, True):
        b = DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                                non_tensors={"uid": uid.copy(), "format": fmt.copy()})  # fmt: skip
        trainer = _trainer(4)
        trainer.vitos = replace(trainer.vitos, mask_malformed=on)
        trainer._compute_old_log_prob = lambda data: (
            DataProto.from_dict(tensors={"old_log_probs": torch.zeros(len(data), T), "entropys": torch.ones(len(data), T)}), 0.0
        )
        metrics: dict = {}
        out = trainer._log_probs_and_advantages(b, metrics, "grounding", {})
        adv, rmask = out.batch["advantages"], out.batch["response_mask"]
        bad = [2, 7] if on else []
        good = [i for i in range(n) if i not in bad]
        assert torch.allclose(adv[good], ref[good], atol=1e-5)  # the group statistics include the malformed
        assert adv[bad].abs().sum() == 0 and rmask[bad].sum() == 0 and rmask[good].sum() == len(good) * T
        assert metrics.get("grounding/masked_malformed") == (0.25 if on else None)
    assert float(ref[1, 0]) > 0  # a wrong but well-formed box beside a malformed one: pushed up, not down


def test_failed_answers_give_their_box_no_feedback():
    """_rewards_with_cross_feedback: a failed reasoning answer is left out of its box's cross-feedback."""
    from verl import DataProto

    trainer = _trainer(2)
    trainer.reward_fn = guard.guard_reward_fn(partial(compute_score, w_fb=1.0, w_iou=1.0, w_fmt=0.5), 5.0)
    T = 4
    info = {"image_size": [512, 512], "gt_boxes": [[100, 100, 300, 300]]}
    g = DataProto.from_dict(
        tensors={"rm_scores": torch.zeros(2, T), "response_mask": torch.ones(2, T, dtype=torch.long)},
        non_tensors={"data_source": np.array(["slake"] * 2, dtype=object), "reward_model": np.array([{"ground_truth": "x"}] * 2, dtype=object),
                     "extra_info": with_stream([info, info], "grounding")},
    )
    r_nt = {k: np.zeros(4) for k in SCORE_KEYS}
    r_nt["acc"] = np.array([1.0, 0.0, 1.0, 1.0])  # answer 1 (box 0) failed: its 0 is no evidence
    r_nt[FAILED_KEY] = np.array([0, 1, 0, 0], dtype=object)
    r = DataProto.from_dict(tensors={"rm_scores": torch.zeros(4, T), "response_mask": torch.ones(4, T, dtype=torch.long)}, non_tensors=r_nt)
    from vitos_verl.pruning import image_geometry
    from vitos_verl.trainer.config import ViToSConfig
    from vitos_verl.trainer.dual_stream import plan_reasoning

    geom = image_geometry(512, 512)
    texts = ["<box>[100, 100, 300, 300]</box>", "<box>[0, 0, 100, 100]</box>"]
    plan = plan_reasoning(texts, [list(geom.grid_thw)] * 2, [(512, 512)] * 2, [[]] * 2, ViToSConfig(n_r=2))
    assert plan.box_index.tolist() == [0, 0, 1, 1]
    trainer._rewards_with_cross_feedback(g, r, plan)
    assert g.non_tensor_batch["feedback"].tolist() == [1.0, 1.0]  # 0.5 for box 0 if the failure counted
    # the keep ratio charged is the planner's mask's, built once
    assert g.non_tensor_batch["keep_ratio"].tolist() == [m.ratio for m in plan.keep_masks] and plan.keep_masks[0].ratio < 1
    assert g.non_tensor_batch["reward_timeout"].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ checkpoints
class _FakeActorGroup:
    """The actor worker group's checkpoint calls, as verl 0.9.1's trainer makes them."""

    def __init__(self, die_after_first_file: bool = False):
        self.die = die_after_first_file
        self.loaded: list[str] = []

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        Path(local_path, "model_world_size_1_rank_0.pt").write_bytes(b"w" * 64)
        if self.die:
            os._exit(17)  # killed mid-save
        Path(local_path, "optim_world_size_1_rank_0.pt").write_bytes(b"o" * 64)

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        self.loaded.append(local_path)


class _FakeLoader:
    def __init__(self, step: int = 0):
        self.step, self.loaded = step, None

    def __len__(self):
        return 100

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.loaded = state


def _ckpt_trainer(root: Path, step: int, mode: str = "auto", resume_from: str | None = None, die: bool = False):
    from vitos_verl.trainer.ray_trainer import ViToSRayTrainer

    t = object.__new__(ViToSRayTrainer)
    t.config = OmegaConf.create({
        "trainer": {"default_local_dir": str(root), "default_hdfs_dir": None, "resume_mode": mode, "resume_from_path": resume_from,
                    "del_local_ckpt_after_load": False},
        "actor_rollout_ref": {"actor": {"checkpoint": {"async_save": False}}},
    })
    t.global_steps, t.use_critic = step, False
    t.actor_rollout_wg, t.train_dataloader = _FakeActorGroup(die), _FakeLoader(step)
    return t


def _save_in_child(root: Path, step: int, how: str) -> int:
    """Save ``step`` in a forked process that dies at ``how``; returns its exit code."""

    def child():
        t = _ckpt_trainer(root, step, die=how == "actor")
        if how == "before_tracker":  # after actor/ and data.pt, before the marker and the tracker
            ckpt.mark_complete = lambda *a: os._exit(18)
        if how == "tracker_rename":  # the tracker's temporary file is written, the rename never happens
            real = os.replace
            os.replace = lambda src, dst: os._exit(19) if str(dst).endswith(ckpt.TRACKER) else real(src, dst)
        t._save_checkpoint()
        os._exit(0)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    return p.exitcode


def _resume(root: Path, **kw):
    t = _ckpt_trainer(root, 0, **kw)
    t._load_checkpoint()
    return t


def test_interrupted_save_resumes_from_the_previous_complete_step(tmp_path):
    import verl.trainer.ppo.ray_trainer as verl_ray_trainer

    root = tmp_path / "ckpt"
    _ckpt_trainer(root, 1)._save_checkpoint()
    assert (root / ckpt.TRACKER).read_text() == "1" and (root / "global_step_1" / ckpt.MARKER).is_file()
    assert "open" not in vars(verl_ray_trainer)  # the capture of verl's tracker write is undone
    lacking = {"actor": ["data.pt (the dataloader state)", f"{ckpt.MARKER} (written when a save finished)"],
               "before_tracker": [f"{ckpt.MARKER} (written when a save finished)"], "tracker_rename": []}
    for how, code in (("actor", 17), ("before_tracker", 18), ("tracker_rename", 19)):
        assert _save_in_child(root, 2, how) == code, how
        assert ckpt.missing_parts(root / "global_step_2", 2) == lacking[how], how
        assert (root / ckpt.TRACKER).read_text() == "1", how  # the tracker still names the last complete save
        t = _resume(root)
        assert t.global_steps == 1, how
        assert t.actor_rollout_wg.loaded == [str(root / "global_step_1" / "actor")] and t.train_dataloader.loaded == {"step": 1}
    # a save that finishes moves the tracker on
    _ckpt_trainer(root, 2)._save_checkpoint()
    assert _resume(root).global_steps == 2 and ckpt.complete_steps(root) == [1, 2]


def test_broken_tracker_is_an_error_that_names_it(tmp_path):
    root = tmp_path / "ckpt"
    assert _resume(root).global_steps == 0  # no tracker: a fresh start
    _ckpt_trainer(root, 1)._save_checkpoint()
    tracker = root / ckpt.TRACKER
    for garbage in ("", "2\x00", "step 3", "-1"):
        tracker.write_text(garbage)
        with pytest.raises(ckpt.CheckpointError, match="not a step number") as e:
            _resume(root)
        assert str(tracker) in str(e.value) and "Complete checkpoints under" in str(e.value) and "[1]" in str(e.value)
    tracker.write_text("5")  # names a folder that does not exist
    with pytest.raises(ckpt.CheckpointError, match="missing the folder itself") as e:
        _resume(root)
    assert str(root / "global_step_5") in str(e.value) and "resume_from_path" in str(e.value)
    assert _save_in_child(root, 3, "actor") == 17  # a partial folder: some shards, no data.pt, no marker
    tracker.write_text("3")
    with pytest.raises(ckpt.CheckpointError, match="data.pt") as e:
        _resume(root)
    assert str(root / "global_step_3") in str(e.value) and ckpt.MARKER in str(e.value)
    # the same folder named by resume_from_path; resume_mode=disable skips the tracker
    with pytest.raises(ckpt.CheckpointError, match="trainer.resume_from_path names"):
        _resume(root, mode="resume_path", resume_from=str(root / "global_step_3"))
    t = _resume(root, mode="resume_path", resume_from=str(root / "global_step_1"))
    assert t.global_steps == 1
    assert _resume(root, mode="disable").global_steps == 0
    # a folder saved before the marker existed gets the legacy hint
    (root / "global_step_1" / ckpt.MARKER).unlink()
    tracker.write_text("1")
    with pytest.raises(ckpt.CheckpointError, match='global_step": 1'):
        _resume(root)


# ------------------------------------------------------------------ one reward function for both streams
_CUSTOM_REWARD = '''
import json

LOG = {log!r}


def my_reward(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
    stream = extra_info["stream"]
    with open(LOG, "a") as f:
        f.write(json.dumps({{"stream": stream, "feedback_acc": extra_info.get("feedback_acc"), "bonus": bonus,
                            "keep_ratio": extra_info.get("keep_ratio")}}) + "\\n")
    if stream == "reasoning":
        return 0.75 + bonus  # a number: verl's score, and acc
    return {{"score": 0.25 + bonus, "iou": 0.5}}
'''


def test_custom_reward_function_reaches_both_streams(cfg, rows, tmp_path):
    """A user's function named in reward.custom_reward_function scores the reasoning stream in
    verl's reward loop (through the ViToS agent-loop worker) and the grounding stream on the
    driver (_rewards_with_cross_feedback), with its reward_kwargs and the stream in extra_info."""
    import json

    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from vitos_verl.rollout.agent_loop import AGENT_NAME, ViToSAgentLoopWorker
    from vitos_verl.trainer.checks import check_config
    from vitos_verl.trainer.dual_stream import configured_reward_fn

    log = tmp_path / "calls.jsonl"
    (tmp_path / "my_reward.py").write_text(_CUSTOM_REWARD.format(log=str(log)))
    c = copy.deepcopy(cfg)
    c.reward.custom_reward_function.path = str(tmp_path / "my_reward.py")
    c.reward.custom_reward_function.name = "my_reward"
    c.reward.custom_reward_function.reward_kwargs = {"bonus": 0.01}
    check_config(c, check_files=False)  # a user's function: its own kwargs, not the vitos block's
    bad = copy.deepcopy(c)
    bad.reward.custom_reward_function.reward_kwargs = {"w_iou": 1.0}
    with pytest.raises(ValueError, match="cannot be called as both streams call it.*w_iou"):
        check_config(bad, check_files=False)
    bad.reward.custom_reward_function.path = None
    with pytest.raises(ValueError, match="must name the reward function of both streams"):
        check_config(bad, check_files=False)

    # reasoning: the ViToS agent-loop worker and verl's real reward-loop worker
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = ViToSAgentLoopWorker(c, llm_client=None)
    worker.llm_client = _FakeServer(worker.tokenizer)
    reward = RewardLoopWorker(c)
    worker.reward_loop_worker_handles = [SimpleNamespace(compute_score=SimpleNamespace(remote=reward.compute_score))]
    n = 2
    raw = np.empty(n, dtype=object)
    raw[:] = [r["raw_prompt"] for r in rows[:n]]
    batch = DataProto.from_dict(
        tensors={"dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8)},
        non_tensors={
            "raw_prompt": raw, "agent_name": np.array([AGENT_NAME] * n, dtype=object),
            "vitos_keep": np.array([""] * n, dtype=object), "index": np.arange(n),
            "data_source": np.array([r["data_source"] for r in rows[:n]], dtype=object),
            "reward_model": np.array([r["reward_model"] for r in rows[:n]], dtype=object),
            "extra_info": with_stream([r["extra_info"] for r in rows[:n]], "reasoning"),
        },
        meta_info={"global_steps": 1, "validate": False},
    )
    r = loop.run_until_complete(worker.generate_sequences(batch))
    loop.close()
    nt = r.non_tensor_batch
    assert set(guard.GUARDED_KEYS) <= set(nt)  # a number became the full key set
    assert nt["score"].tolist() == pytest.approx([0.76] * n) and nt["acc"].tolist() == pytest.approx([0.76] * n)
    assert r.batch["rm_scores"].sum(-1).tolist() == pytest.approx([0.76] * n)

    # grounding: the driver, through the same configured function
    trainer = _trainer(1)
    trainer.reward_fn = configured_reward_fn(c)
    T = 4
    g = DataProto.from_dict(
        tensors={"rm_scores": torch.zeros(n, T), "response_mask": torch.ones(n, T, dtype=torch.long)},
        non_tensors={"data_source": batch.non_tensor_batch["data_source"], "reward_model": batch.non_tensor_batch["reward_model"],
                     "extra_info": with_stream([r_["extra_info"] for r_ in rows[:n]], "grounding")},
    )
    plan = SimpleNamespace(grounding_texts=[REPLY] * n, box_index=np.arange(n), grounding_keep_ratios=lambda: np.full(n, 0.375))
    scores = trainer._rewards_with_cross_feedback(g, r, plan)
    assert scores["grounding"]["score"].tolist() == pytest.approx([0.26] * n)
    assert g.non_tensor_batch["iou"].tolist() == [0.5] * n and g.non_tensor_batch["reward_error"].tolist() == [0.0] * n
    assert float(g.batch["token_level_scores"].sum()) == pytest.approx(0.26 * n)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["stream"] for x in calls].count("reasoning") == n and [x["stream"] for x in calls].count("grounding") == n
    assert all(x["bonus"] == 0.01 for x in calls)
    assert [x["feedback_acc"] for x in calls if x["stream"] == "grounding"] == pytest.approx([0.76] * n)  # the answers' acc
    assert [x["keep_ratio"] for x in calls if x["stream"] == "grounding"] == [0.375] * n  # the plan's, not rebuilt
