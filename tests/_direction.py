"""One ViToS training step through the real pieces, with scripted model outputs (run by
tests/test_learning_direction.py in its own process: verl's CPU platform is chosen at import).

Real: verl 0.9.1's agent-loop worker with ViToS's pruned agent loop and post-processing, verl's
reward-loop worker running the configured reward function (the reasoning stream), the ViToS
trainer's ``train_step`` (grounding rollout, keep-mask planning, reasoning rollout on the kept
visual tokens, cross-feedback, GRPO advantages per stream, the two sequential updates), and the
ViToS actor worker (verl's FSDP engine on the CPU with the pruned-input forward) for every
log-prob and the updates. Scripted: the "vLLM server" answers each request from a script instead
of sampling: per question, box A (the evidence quadrant) and box B (the opposite quadrant); an
answer is right exactly when its request's keep mask covers the evidence (so box A's answers are
right and box B's wrong, through the real planner and the real keep masks).

After the step the updated actor recomputes the log-probabilities of every sample of both
streams on the inputs the step trained on. Writes JSON: per stream and sample the response text,
its advantage, score, keep ratio, and the change of its summed log-probability.

    python tests/_direction.py OUT.json DATA_DIR MODEL_DIR [hydra overrides of recipes/learn_cpu.yaml]
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import sys
from types import SimpleNamespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BOX = {0: "[0, 0, 112, 112]", 1: "[112, 0, 224, 112]", 2: "[0, 112, 112, 224]", 3: "[112, 112, 224, 224]"}  # row-major
OPPOSITE = {0: 3, 3: 0, 1: 2, 2: 1}


def main(out_path: str, data_dir: str, model_dir: str, *extra: str) -> None:
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))  # fmt: skip
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.utils import create_rl_dataset
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.workers.rollout.replica import TokenOutput

    from vitos_verl.compat import verl_0_9
    from vitos_verl.pruning import KEEP_KWARG, KeepMask
    from vitos_verl.rollout.agent_loop import ROUTE_PREFIX, ViToSAgentLoopWorker
    from vitos_verl.trainer.config import ViToSConfig
    from vitos_verl.trainer.dual_stream import configured_reward_fn
    from vitos_verl.trainer.main import ViToSActorRolloutRefWorker
    from vitos_verl.trainer.ray_trainer import ViToSRayTrainer
    from vitos_verl.trainer.rollout_dump import GenerationDumps
    from vitos_verl.trainer.streams import update_stages

    recipes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files=[{data_dir}/train.parquet]",
        f"data.val_files={data_dir}/val.parquet", "vitos.n_g=2", "vitos.n_r=2",
        # the grounding reward is the cross-feedback alone: a box earns what its answers earned
        "vitos.w_iou=0.0", "vitos.w_fmt=0.0", "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        # plain SGD: an update follows the policy gradient (Adam's first step is its sign)
        "actor_rollout_ref.actor.optim.optimizer=SGD", "actor_rollout_ref.actor.optim.lr=0.05",
        "actor_rollout_ref.actor.optim.weight_decay=0.0", "trainer.rollout_data_dir=null", "trainer.validation_data_dir=null",
        "data.shuffle=false", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=os.path.abspath(recipes), version_base=None):
        cfg = compose(config_name="learn_cpu", overrides=overrides)
    cfg.outputs_dir = os.path.dirname(out_path)
    OmegaConf.resolve(cfg)

    model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    tokenizer, processor = model_config.tokenizer, model_config.processor
    dataset = create_rl_dataset(cfg.data.train_files, cfg.data, tokenizer, processor, is_train=True)
    # two questions with their evidence in the same quadrant and different answers: box A (the
    # evidence) and box B (the opposite quadrant) are the same two texts in both questions
    quads = [tuple(map(float, BOX[k][1:-1].split(", "))) for k in range(4)]
    first = dataset[0]
    quadrant = quads.index(tuple(first["extra_info"]["gt_boxes"][0]))
    rows = [first]
    for i in range(1, len(dataset)):
        row = dataset[i]
        same = quads.index(tuple(row["extra_info"]["gt_boxes"][0])) == quadrant
        if same and row["reward_model"]["ground_truth"] != first["reward_model"]["ground_truth"]:
            rows.append(row)
            break
    assert len(rows) == 2, "the task has no second question with the same evidence quadrant"
    quadrants = [quadrant, quadrant]
    batch_dict = collate_fn(rows)

    # the actor: ViToS's worker over verl's FSDP engine, in this process
    actor = ViToSActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    actor.init_model()

    class OneRank:
        """verl's worker group with one rank, in-process: the TensorDict chunked as verl's dispatch
        chunks it (``BatchData.chunk``), pickled as Ray sends it, the output collected as verl does."""

        _dispatch_info = {"actor": [0]}  # one data-parallel rank (verl's _get_dp_size)

        def _call(self, method, td):
            from verl.protocol import BatchData
            from verl.single_controller.base.decorator import _concat_data_proto_or_future

            (chunk,) = BatchData(td).chunk(1)
            return _concat_data_proto_or_future([getattr(actor, method)(pickle.loads(pickle.dumps(chunk)))])

        def compute_log_prob(self, td):
            return self._call("compute_log_prob", td)

        def update_actor(self, td):
            return self._call("update_actor", td)

    # the rollout: verl's agent-loop worker (ViToS's), a scripted server, verl's reward-loop worker
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    uids: dict[str, int] = {}  # the question's uid -> its index in rows (by order of first request)
    seen: dict[str, int] = {}
    answers = [r["reward_model"]["ground_truth"] for r in rows]

    class ScriptedServer:
        async def generate(self, *, request_id, prompt_ids, sampling_params, mm_processor_kwargs=None, **_):
            uid = str(request_id)[len(ROUTE_PREFIX):]
            q = uids.setdefault(uid, len(uids))
            keep = (mm_processor_kwargs or {}).get(KEEP_KWARG)
            if keep is None:  # a grounding request: box A, then box B
                k = seen.get(uid, 0)
                seen[uid] = k + 1
                quadrant = quadrants[q] if k % 2 == 0 else OPPOSITE[quadrants[q]]
                text = f"<box>{BOX[quadrant]}</box>"
            else:  # a reasoning request: right exactly when the kept cells include the evidence quadrant
                mask = KeepMask.decode(keep, (8, 8)).cells
                r0, c0 = divmod(quadrants[q], 2)
                right = bool(mask[4 * r0 : 4 * r0 + 4, 4 * c0 : 4 * c0 + 4].all())
                wrong = "red" if answers[q] != "red" else "blue"
                text = f"<think>The disc is {answers[q] if right else wrong}.</think><answer>{answers[q] if right else wrong}</answer>"
            return TokenOutput(token_ids=tokenizer.encode(text) + [tokenizer.eos_token_id], extra_fields={})

    class Handle:  # a Ray actor handle on a plain object: `await h.method.remote(...)`
        def __init__(self, obj):
            self._obj = obj

        def __getattr__(self, name):
            fn = getattr(self._obj, name)
            return SimpleNamespace(remote=lambda *a, **k: fn(*a, **k))

    agent = ViToSAgentLoopWorker(cfg, llm_client=None)
    agent.llm_client = ScriptedServer()
    agent.reward_loop_worker_handles = [Handle(RewardLoopWorker(cfg))]

    class RolloutManager:
        def generate_sequences(self, batch):
            # questions are told apart by the order of their uids, as the trainer sets them
            for uid in batch.non_tensor_batch["uid"]:
                uids.setdefault(str(uid), len(uids))
            batch = pickle.loads(pickle.dumps(batch))  # as Ray sends it (decodes the images the samples share)
            return loop.run_until_complete(agent.generate_sequences(batch))

    trainer = object.__new__(ViToSRayTrainer)  # the attributes its __init__ sets, without Ray workers
    verl_0_9.install()
    trainer.config, trainer.tokenizer, trainer.processor = cfg, tokenizer, processor
    trainer.vitos = ViToSConfig.from_mapping(OmegaConf.to_container(cfg.vitos))
    trainer.stages = update_stages(trainer.vitos.order)
    trainer.update_steps = trainer.vitos.update_optim_steps(2, 2)
    trainer.min_pixels, trainer.max_pixels = int(dataset.min_pixels), int(dataset.max_pixels)
    trainer.reward_fn = configured_reward_fn(cfg)
    trainer.dumps = GenerationDumps.from_config(cfg, tokenizer, trainer.min_pixels, trainer.max_pixels, verl_logger=None)
    trainer.global_steps = 1
    trainer.use_reference_policy = False
    trainer.async_rollout_manager = RolloutManager()
    trainer.actor_rollout_wg = OneRank()
    trainer.checkpoint_manager = SimpleNamespace(sleep_replicas=lambda: None, update_weights=lambda step: None)
    trainer.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    out: dict = {"streams": {}}
    update = trainer._update

    def update_and_measure(batches, metrics, timing):
        """verl's updates in the trainer's order; after each, the updated stream's log-probs."""
        stages = trainer.stages
        for stage in stages:
            before = {s: batches[s].slice(0, len(batches[s])) for s in stage}
            trainer.stages = (stage,)
            update(batches, metrics, timing)
            for stream, b in before.items():
                new, _ = trainer._compute_old_log_prob(b)
                mask = b.batch["response_mask"].float()
                delta = ((new.batch["old_log_probs"] - b.batch["old_log_probs"]) * mask).sum(-1)
                adv = (b.batch["advantages"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                texts, nt = trainer._decode(b), b.non_tensor_batch
                out["streams"][stream] = [
                    {"uid": str(nt["uid"][i]), "text": texts[i], "advantage": float(adv[i]), "score": float(nt["score"][i]),
                     "acc": float(nt["acc"][i]), "keep_ratio": float(nt["keep_ratio"][i]), "delta_logp": float(delta[i]),
                     "old_logp": float((b.batch["old_log_probs"][i] * mask[i]).sum())}
                    for i in range(len(b))
                ]  # fmt: skip
        trainer.stages = stages

    trainer._update = update_and_measure
    metrics = trainer.train_step(batch_dict)
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    loop.close()
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({s: [(r["text"][-40:], round(r["advantage"], 2), round(r["delta_logp"], 4)) for r in v]
                      for s, v in out["streams"].items()}, indent=1))  # fmt: skip
    _ = np, torch


if __name__ == "__main__":
    main(*sys.argv[1:])
