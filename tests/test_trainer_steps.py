"""Per-stream optimiser steps through verl 0.9.1's own update path, verl's timing/throughput
metrics per stream, and the training loop's saves and validations (no Ray: verl's dispatch,
worker and mini-batch loop run in-process with a stub engine step)."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl import DataProto
from verl.single_controller.base.decorator import _concat_data_proto_or_future
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.loop import final_actions, last_step, step_actions
from vitos_verl.trainer.main import ViToSActorRolloutRefWorker
from vitos_verl.trainer.perf import step_perf_metrics, stream_perf_metrics
from vitos_verl.trainer.ray_trainer import ViToSRayTrainer
from vitos_verl.trainer.streams import update_stages

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MAX_PIXELS = 28 * 28 * 64
B, N_G, N_R, MB = 4, 2, 3, 2  # questions per step, boxes per question, answers per box, questions per verl mini-batch
P_LEN, R_LEN = 400, 48  # data.max_prompt_length, data.max_response_length of recipes/smoke_cpu.yaml


# ---------------------------------------------------------------- real batches of both streams
@pytest.fixture(scope="module")
def ds(slake_dataset):
    return slake_dataset(MAX_PIXELS)


def _prompt_ids(ds, processor, chat) -> torch.Tensor:
    """What verl's agent loop tokenises for a chat (image tokens included)."""
    images, _ = asyncio.run(ds.process_vision_info(chat, ds.image_patch_size, ds.config))
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]


def _layout(prompts: list[torch.Tensor], responses: list[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """verl's agent-loop layout: prompts left-padded to ``max_prompt_length``, responses
    right-padded to ``max_response_length`` (the smoke recipe's), (N, L) masks."""
    p_len, r_len = P_LEN, R_LEN
    assert max(len(p) for p in prompts) <= p_len and max(len(r) for r in responses) <= r_len
    n = len(prompts)
    p_ids, r_ids = torch.full((n, p_len), pad), torch.full((n, r_len), pad)
    p_mask, r_mask = torch.zeros(n, p_len, dtype=torch.int64), torch.zeros(n, r_len, dtype=torch.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids[i, p_len - len(p):], p_mask[i, p_len - len(p):] = p, 1
        r_ids[i, : len(r)], r_mask[i, : len(r)] = r, 1
    attention = torch.cat([p_mask, r_mask], -1)
    return {
        "prompts": p_ids,
        "responses": r_ids,
        "input_ids": torch.cat([p_ids, r_ids], -1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": r_mask,
        "old_log_probs": -torch.rand(n, r_len),
        "advantages": torch.randn(n, r_len),
    }


@pytest.fixture(scope="module")
def streams(ds, tiny_processor) -> dict[str, DataProto]:
    """One step's batches: B real SLAKE questions, N_G boxes each, N_R answers per box."""
    tok = tiny_processor.tokenizer
    rows = [ds[i] for i in range(0, 37 * B, 37)]
    out = {}
    for name, key, reps in (("grounding", "raw_prompt", N_G), ("reasoning", "raw_reasoning_prompt", N_G * N_R)):
        prompts, responses, uids = [], [], []
        for q, row in enumerate(rows):
            ids = _prompt_ids(ds, tiny_processor, row[key])
            answer = row["reward_model"]["ground_truth"]
            text = "<box>[10, 20, 120, 140]</box>" if name == "grounding" else f"<think>look</think><answer>{answer}</answer>"
            for k in range(reps):
                prompts.append(ids)
                responses.append(torch.tensor(tok(text * (1 + k % 2))["input_ids"]))
                uids.append(f"q{q}")
        out[name] = DataProto.from_dict(
            tensors=_layout(prompts, responses, tok.pad_token_id), non_tensors={"uid": np.array(uids, dtype=object)}
        )
    assert len(out["grounding"]) == B * N_G and len(out["reasoning"]) == B * N_G * N_R
    return out


# ---------------------------------------------------------------- verl's update path in-process
class _Engine:
    """The engine calls verl's TrainingWorker.train_mini_batch makes around its mini-batch loop."""

    def __init__(self, dp: int, rank: int):
        self.dp, self.rank = dp, rank
        # a warm-up schedule, as verl's FSDP engine builds one: the LR climbs once per scheduler step
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 10))

    def lr_scheduler_step(self):  # verl 0.9.1 FSDPEngine.lr_scheduler_step
        self.lr_scheduler.step()
        return self.lr_scheduler.get_last_lr()[0]

    def get_data_parallel_size(self):
        return self.dp

    def get_data_parallel_rank(self):
        return self.rank

    def get_data_parallel_group(self):
        return None  # the default (one-process) group: all_gather_object of the token counts

    def train_mode(self, **_):
        return contextlib.nullcontext()

    def is_mp_src_rank_with_outputs(self):
        return True


def _worker(cls, dp: int, rank: int):
    """A data-parallel rank of ``cls`` whose engine step (``TrainingWorker.train_batch``, one
    optimiser step in verl 0.9.1) only records the mini-batch it got."""
    w = object.__new__(cls)
    w.profiler = None  # DistProfiler.annotate runs the method itself
    w.enable_routing_replay = False
    actor = object.__new__(TrainingWorker)
    actor.engine = _Engine(dp, rank)
    actor.profiler = SimpleNamespace(step=lambda: None)
    actor.steps = []

    def train_batch(td):
        actor.steps.append((len(td), tu.get(td, "global_batch_size")))
        if tu.get(td, "update_lr_scheduler", default=False):  # as TrainingWorker.train_batch does
            actor.engine.lr_scheduler_step()
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"grad_norm": 1.0, "mfu": 0.25, "pg_loss": 0.1}})

    actor.train_batch = train_batch
    w.actor = actor
    return w


class _WorkerGroup:
    """verl's ``make_nd_compute_dataproto_dispatch_fn`` in-process: the TensorDict chunked over the
    data-parallel ranks (``BatchData.chunk``), each chunk pickled to its worker as Ray sends it
    (which also unlocks verl's consolidated chunk), outputs concatenated as verl collects them."""

    def __init__(self, cls, dp: int):
        self.ranks = [_worker(cls, dp, r) for r in range(dp)]

    def update_actor(self, td):
        from verl.protocol import BatchData

        chunks = [pickle.loads(pickle.dumps(c)) for c in BatchData(td).chunk(len(self.ranks))]
        return _concat_data_proto_or_future([w.update_actor(c) for w, c in zip(self.ranks, chunks)])

    def steps(self) -> list[list[tuple[int, int]]]:
        out = [list(w.actor.steps) for w in self.ranks]
        for w in self.ranks:
            w.actor.steps.clear()
        return out


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """verl's mini-batch loop all-gathers token counts over the data-parallel group."""
    if torch.distributed.is_initialized():
        yield
        return
    init = tmp_path_factory.mktemp("pg") / "init"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _config(*overrides: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(
            config_name="smoke_cpu",
            overrides=[f"data.train_batch_size={B}", f"actor_rollout_ref.actor.ppo_mini_batch_size={MB}",
                       f"vitos.n_g={N_G}", f"vitos.n_r={N_R}", *overrides],
        )


def _trainer(cfg, worker_cls, dp: int) -> ViToSRayTrainer:
    t = object.__new__(ViToSRayTrainer)
    t.config = cfg
    t.vitos = ViToSConfig.from_mapping(OmegaConf.to_container(cfg.vitos))
    t.vitos.check_batch(B, MB)
    t.stages = update_stages(t.vitos.order)
    t.update_steps = t.vitos.update_optim_steps(B, MB)
    t.actor_rollout_wg = _WorkerGroup(worker_cls, dp)
    return t


def _run_update(t, streams) -> tuple[dict, dict[str, list]]:
    batches = {k: v.slice(0, len(v)) for k, v in streams.items()}  # _update changes meta_info / keys
    metrics, timing, seen = {}, {}, {}
    for stage in t.stages:  # one stage at a time, to see each update's mini-batches
        t.stages = (stage,)
        t._update(batches, metrics, timing)
        seen["+".join(stage)] = t.actor_rollout_wg.steps()
    return metrics, seen


@pytest.mark.parametrize("dp", [1, 2])
def test_both_streams_take_equal_optimiser_steps_by_default(streams, dp):
    """Default: each update takes train_batch_size / ppo_mini_batch_size steps; the reasoning
    mini-batch holds n_r times the grounding one's samples."""
    t = _trainer(_config(), ViToSActorRolloutRefWorker, dp)
    metrics, seen = _run_update(t, streams)
    steps = B // MB
    for name, n in (("grounding", B * N_G), ("reasoning", B * N_G * N_R)):
        assert metrics[f"actor/{name}/optim_steps"] == steps
        for rank in seen[name]:  # every rank: `steps` mini-batches of n / steps / dp samples
            assert rank == [(n // steps // dp, n // steps)] * steps
        assert metrics[f"{name}/perf/mfu/actor"] == pytest.approx(0.25)
        assert metrics[f"actor/{name}/grad_norm"] == pytest.approx(1.0)


def test_verl_sizing_alone_gives_reasoning_n_r_times_the_steps(streams):
    """verl's own worker (no ViToS mini-batch size): ppo_mini_batch_size x rollout.n samples per step."""
    t = _trainer(_config(), ActorRolloutRefWorker, 1)
    metrics, seen = _run_update(t, streams)
    assert metrics["actor/grounding/optim_steps"] == B // MB
    assert metrics["actor/reasoning/optim_steps"] == N_R * B // MB
    assert seen["reasoning"][0] == [(MB * N_G, MB * N_G)] * (N_R * B // MB)


def test_configured_steps_and_epochs(streams):
    t = _trainer(_config("vitos.optim_steps.reasoning=4", "actor_rollout_ref.actor.ppo_epochs=2"), ViToSActorRolloutRefWorker, 2)
    metrics, seen = _run_update(t, streams)
    assert metrics["actor/grounding/optim_steps"] == 2 * (B // MB)
    assert metrics["actor/reasoning/optim_steps"] == 2 * 4
    assert seen["reasoning"][1] == [(B * N_G * N_R // 4 // 2, B * N_G * N_R // 4)] * 8


def test_joint_update_takes_the_configured_steps(streams):
    t = _trainer(_config("vitos.order=joint"), ViToSActorRolloutRefWorker, 1)
    metrics, seen = _run_update(t, streams)
    n = B * N_G * (1 + N_R)
    assert metrics["actor/grounding+reasoning/optim_steps"] == B // MB
    assert seen["grounding+reasoning"][0] == [(n // (B // MB), n // (B // MB))] * (B // MB)
    assert "grounding+reasoning/perf/mfu/actor" in metrics


@pytest.mark.parametrize("order", ["grounding_first", "joint"])
def test_lr_scheduler_steps_once_per_vitos_step(streams, order):
    """verl steps the LR scheduler after every update_actor call; a ViToS step updates twice, and
    the schedule must still advance once per step (only the step's last update steps it)."""
    t = _trainer(_config(f"vitos.order={order}"), ViToSActorRolloutRefWorker, 2)
    for _ in range(3):
        t._update({k: v.slice(0, len(v)) for k, v in streams.items()}, {}, {})
    for w in t.actor_rollout_wg.ranks:
        assert w.actor.engine.lr_scheduler.last_epoch == 3
        assert w.actor.engine.lr_scheduler.get_last_lr()[0] == pytest.approx(0.4)
        assert "lr_scheduler_step" not in vars(w.actor.engine)  # the engine's own method is back
    # verl's own worker ignores the mark: two scheduler steps per ViToS step (the bug fixed)
    t = _trainer(_config(), ActorRolloutRefWorker, 1)
    for _ in range(3):
        t._update({k: v.slice(0, len(v)) for k, v in streams.items()}, {}, {})
    assert t.actor_rollout_wg.ranks[0].actor.engine.lr_scheduler.last_epoch == 6


def test_optim_steps_config():
    assert ViToSConfig().update_optim_steps(128, 32) == {"grounding": 4, "reasoning": 4}
    assert ViToSConfig(optim_steps={"reasoning": 8}).update_optim_steps(128, 32) == {"grounding": 4, "reasoning": 8}
    assert ViToSConfig(order="joint").update_optim_steps(128, 32) == {"grounding+reasoning": 4}
    with pytest.raises(ValueError, match="one count"):
        ViToSConfig(order="joint", optim_steps={"grounding": 2}).update_optim_steps(128, 32)
    with pytest.raises(ValueError, match="must divide"):
        ViToSConfig(optim_steps={"reasoning": 3}).check_batch(128, 32)
    for bad in ({"answers": 2}, {"grounding": 0}, {"reasoning": 1.5}, {"reasoning": True}):
        with pytest.raises(ValueError, match="optim_steps"):
            ViToSConfig(optim_steps=bad)
    with pytest.raises(ValueError, match="optim_steps"):
        ViToSConfig.from_mapping(OmegaConf.to_container(_config("vitos.optim_steps.reasoning=-1").vitos))


# ---------------------------------------------------------------- verl's metrics per stream
TIMING = {
    "gen_grounding": 1.3, "gen_grounding/generate_sequences": 1.2, "prune": 0.1, "gen_reasoning": 2.0, "reward": 0.2,
    "old_log_prob/grounding": 2.1, "ref/grounding": 1.0, "adv/grounding": 0.01,
    "old_log_prob/reasoning": 3.5, "ref/reasoning": 1.6, "adv/reasoning": 0.02,
    "update/grounding": 2.5, "update/reasoning": 4.2, "update_weights": 0.5, "step": 19.0,
}


def test_verl_timing_and_throughput_per_stream(streams):
    for name in ("grounding", "reasoning"):
        b = streams[name]
        m = stream_perf_metrics(name, b, TIMING, n_gpus=2)
        stage = {"gen": f"gen_{name}", "old_log_prob": f"old_log_prob/{name}", "ref": f"ref/{name}",
                 "adv": f"adv/{name}", "update_actor": f"update/{name}"}
        step = sum(TIMING[v] for v in stage.values())
        tokens = int(b.batch["attention_mask"].sum())
        resp_tokens = int(b.batch["response_mask"].sum())
        assert m[f"{name}/perf/total_num_tokens"] == tokens
        assert m[f"{name}/perf/time_per_step"] == pytest.approx(step)
        assert m[f"{name}/perf/throughput"] == pytest.approx(tokens / (step * 2))
        assert m[f"{name}/timing_per_token_ms/gen"] == pytest.approx(TIMING[f"gen_{name}"] * 1000 / resp_tokens)
        for verl_name in ("ref", "adv", "update_actor"):
            assert m[f"{name}/timing_per_token_ms/{verl_name}"] == pytest.approx(TIMING[stage[verl_name]] * 1000 / tokens)
        for verl_name, ours in stage.items():
            assert m[f"{name}/timing_s/{verl_name}"] == TIMING[ours]
    # the reasoning stream is n_r times the samples: more tokens than grounding
    g = stream_perf_metrics("grounding", streams["grounding"], TIMING, 1)
    r = stream_perf_metrics("reasoning", streams["reasoning"], TIMING, 1)
    assert r["reasoning/perf/total_num_tokens"] > N_R * 0.5 * g["grounding/perf/total_num_tokens"]
    # joint: one update of both streams, so no per-stream update_actor
    joint = {k: v for k, v in TIMING.items() if not k.startswith("update/")} | {"update/grounding+reasoning": 6.0}
    m = stream_perf_metrics("grounding", streams["grounding"], joint, 1)
    assert "grounding/timing_s/update_actor" not in m and "grounding/perf/throughput" in m
    whole = step_perf_metrics(streams, TIMING, n_gpus=2)
    total = sum(int(b.batch["attention_mask"].sum()) for b in streams.values())
    assert whole == {"perf/total_num_tokens": total, "perf/time_per_step": 19.0, "perf/throughput": pytest.approx(total / 38.0)}


# ---------------------------------------------------------------- saves and validations of the loop
class _Loader:
    """A dataloader of ``n`` batches an epoch whose ``len`` may claim more (a short resumed epoch)."""

    def __init__(self, n: int, claimed: int | None = None):
        self.n, self.claimed = n, claimed or n

    def __len__(self):
        return self.claimed

    def __iter__(self):
        return iter([{"i": i} for i in range(self.n)])


def _fit(total_steps: int, loader: _Loader, epochs: int, save_freq: int, test_freq: int, resume: int = 0):
    """Run ViToSRayTrainer.fit with every Ray-side call stubbed; returns what it did."""
    t = object.__new__(ViToSRayTrainer)
    t.config = OmegaConf.create(
        {"trainer": {"val_before_train": False, "total_epochs": epochs, "save_freq": save_freq, "test_freq": test_freq,
                     "esi_redundant_time": 0}}
    )
    t.total_training_steps = total_steps
    t.train_dataloader, t.val_dataloader = loader, object()
    done = SimpleNamespace(steps=[], saves=[], in_step=[], validations=[], logged=[])
    t._tracker = lambda: SimpleNamespace(log=lambda data, step: done.logged.append((step, sorted(data))))
    t.load_checkpoint = lambda: setattr(t, "global_steps", resume)
    t.checkpoint_manager = SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
    t.save_checkpoint = lambda: done.saves.append(t.global_steps)

    def _validate():
        done.validations.append(t.global_steps)
        return {"val/acc": 0.5}

    def train_step(batch, save=False):
        done.steps.append(t.global_steps)
        if save:  # inside the step, while vLLM sleeps
            done.in_step.append(t.global_steps)
            t.save_checkpoint()
        return {"timing_s/step": 0.01}

    t.validate, t.train_step = _validate, train_step
    t.fit()
    return done


def test_loop_follows_verl_frequencies_and_ends_with_save_and_validation():
    d = _fit(total_steps=5, loader=_Loader(3), epochs=2, save_freq=2, test_freq=3)
    assert d.steps == [1, 2, 3, 4, 5]
    assert d.saves == [2, 4, 5] and d.validations == [3, 5]
    assert [s for s, keys in d.logged if "val/acc" in keys] == [3, 5]


def test_loop_that_runs_out_of_data_still_saves_and_validates_its_last_step():
    # total_training_steps above 3 batches x 2 epochs: verl's loop would stop at 6 with neither
    d = _fit(total_steps=10, loader=_Loader(3), epochs=2, save_freq=4, test_freq=4)
    assert d.steps == [1, 2, 3, 4, 5, 6]
    assert d.saves == d.in_step == [4, 6] and d.validations == [4, 6]
    # the dataloader yields fewer batches than its length: the fallback, once per step
    d = _fit(total_steps=6, loader=_Loader(2, claimed=3), epochs=2, save_freq=3, test_freq=4)
    assert d.steps == [1, 2, 3, 4]
    assert d.saves == [3, 4] and d.in_step == [3] and d.validations == [4]
    d = _fit(total_steps=6, loader=_Loader(2, claimed=3), epochs=2, save_freq=2, test_freq=2)
    assert d.saves == [2, 4] and d.validations == [2, 4]  # step 4 already saved and validated: not again


def test_loop_frequencies_off_and_resume():
    d = _fit(total_steps=4, loader=_Loader(4), epochs=1, save_freq=-1, test_freq=0)
    assert d.steps == [1, 2, 3, 4] and d.saves == [] and d.validations == []
    d = _fit(total_steps=4, loader=_Loader(4), epochs=2, save_freq=3, test_freq=3, resume=2)
    assert d.steps == [3, 4] and d.saves == [3, 4] and d.validations == [3, 4]
    d = _fit(total_steps=4, loader=_Loader(4), epochs=1, save_freq=1, test_freq=1, resume=4)
    assert d.steps == [] and d.saves == [] and d.validations == []


def test_loop_saves_every_step_when_the_capacity_block_expires(monkeypatch):
    """verl's ESI rule: save when the block ends within one step + the save time (from step 2 on)."""
    monkeypatch.setenv("MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP", str(time.time() + 30))
    d = _fit(total_steps=4, loader=_Loader(4), epochs=1, save_freq=10, test_freq=-1)
    assert d.saves == [2, 3, 4]


def test_loop_decisions():
    assert last_step(10, 3, 2) == 6 and last_step(5, 3, 2) == 5
    assert step_actions(4, 5, 2, 3) == step_actions(4, 5, 2, 3, esi_expiring=False)
    assert step_actions(4, 5, 2, 3).save and not step_actions(4, 5, 2, 3).validate
    assert step_actions(5, 5, 2, 3).save and step_actions(5, 5, 2, 3).validate
    assert not step_actions(5, 5, 0, -1).save and not step_actions(5, 5, 0, -1).validate
    assert final_actions(4, 4, 3, 2, 3).validate and not final_actions(4, 4, 3, 2, 3).save
