"""ViToS training steps through the real pieces in one process, with a controlled "vLLM server"
(run by tests/test_learning_direction.py and tests/test_learning.py in their own process: verl's
CPU platform is chosen when verl is imported).

Real: verl 0.9.1's agent-loop worker with ViToS's pruned agent loop and post-processing, verl's
reward-loop worker running the configured reward function (the reasoning stream), the ViToS
trainer's ``train_step`` (grounding rollout, keep-mask planning, reasoning rollout on the kept
visual tokens, cross-feedback, GRPO advantages per stream, the two sequential updates), and the
ViToS actor worker (verl's FSDP engine on the CPU with the pruned-input forward) for every
log-prob and the updates. The server answers each request from a *policy* function instead of
vLLM's sampler; boxes are quadrant boxes, answers colour words.

Modes (the first argument):

* ``direction``: one step, scripted: per question, box A (the evidence quadrant) and box B (the
  opposite quadrant); an answer is right exactly when its request's keep mask covers the
  evidence. After each update, the log-probabilities of that stream's samples again.
* ``learn``: STEPS steps on a task the policy can learn without reading the image (every target
  in one quadrant, one colour). Each step first scores every candidate (4 boxes per question, 4
  answers per box) with the current actor, then the server *samples* each request's output from
  the policy restricted to the candidates (softmax of their summed log-probs): GRPO on the
  policy's own samples, as with vLLM, over a 4-way choice per stream. Records the policy's
  probability of the right box and of the right answer under it, and the sampled rewards.

Writes JSON to OUT.

    python tests/_inprocess.py direction|learn OUT.json DATA_DIR MODEL_DIR [hydra overrides of recipes/learn_cpu.yaml]
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


# the quadrant boxes, row-major, every coordinate 3 digits long: Qwen's tokenizer splits digits,
# so the four texts have the same number of tokens and a random policy does not prefer the
# shortest (a summed log-prob is about -11 a token: one token fewer is e^11 more likely)
BOX = {0: "[0.0, 0.0, 112, 112]", 1: "[112, 0.0, 224, 112]", 2: "[0.0, 112, 112, 224]", 3: "[112, 112, 224, 224]"}
OPPOSITE = {0: 3, 3: 0, 1: 2, 2: 1}


def harness(out_dir: str, data_dir: str, model_dir: str, overrides: list[str]):
    """The trainer, its dataset and the server's policy hook (see module doc)."""
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))  # fmt: skip
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.utils import create_rl_dataset
    from verl.utils.config import omega_conf_to_dataclass
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
    base = [
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files=[{data_dir}/train.parquet]",
        f"data.val_files={data_dir}/val.parquet", "trainer.rollout_data_dir=null", "trainer.validation_data_dir=null",
        "data.shuffle=false", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=os.path.abspath(recipes), version_base=None):
        cfg = compose(config_name="learn_cpu", overrides=base + list(overrides))
    cfg.outputs_dir = out_dir
    OmegaConf.resolve(cfg)
    model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    tokenizer, processor = model_config.tokenizer, model_config.processor
    dataset = create_rl_dataset(cfg.data.train_files, cfg.data, tokenizer, processor, is_train=True)

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

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    h = SimpleNamespace(cfg=cfg, dataset=dataset, tokenizer=tokenizer, loop=loop, uids={}, counts={}, policy=None, actor=actor)

    class Server:
        """vLLM's place: ``h.policy(question, quadrant_or_None, k)`` gives the k-th output of a
        question's grounding requests (quadrant None) or of the reasoning requests whose keep mask
        covers that quadrant (the box they were planned from)."""

        async def generate(self, *, request_id, prompt_ids, sampling_params, mm_processor_kwargs=None, **_):
            uid = str(request_id)[len(ROUTE_PREFIX):]
            q = h.uids.setdefault(uid, len(h.uids))
            keep = (mm_processor_kwargs or {}).get(KEEP_KWARG)
            quadrant = None
            if keep is not None:
                cells = KeepMask.decode(keep, (8, 8)).cells
                quadrant = next(k for k in range(4) if bool(cells[4 * (k // 2) : 4 * (k // 2) + 4, 4 * (k % 2) : 4 * (k % 2) + 4].all()))
            key = (uid, quadrant)
            k = h.counts[key] = h.counts.get(key, -1) + 1
            text = h.policy(q, quadrant, k)
            return TokenOutput(token_ids=tokenizer.encode(text) + [tokenizer.eos_token_id], extra_fields={})

    class Handle:  # a Ray actor handle on a plain object: `await h.method.remote(...)`
        def __init__(self, obj):
            self._obj = obj

        def __getattr__(self, name):
            fn = getattr(self._obj, name)
            return SimpleNamespace(remote=lambda *a, **k: fn(*a, **k))

    agent = ViToSAgentLoopWorker(cfg, llm_client=None)
    agent.llm_client = Server()
    agent.reward_loop_worker_handles = [Handle(RewardLoopWorker(cfg))]

    class RolloutManager:
        def generate_sequences(self, batch):
            # questions are told apart by the order of their uids, as the trainer sets them
            for uid in batch.non_tensor_batch["uid"]:
                h.uids.setdefault(str(uid), len(h.uids))
            batch = pickle.loads(pickle.dumps(batch))  # as Ray sends it (decodes the images the samples share)
            return loop.run_until_complete(agent.generate_sequences(batch))

    trainer = object.__new__(ViToSRayTrainer)  # the attributes its __init__ sets, without Ray workers
    verl_0_9.install()
    b, mb = int(cfg.data.train_batch_size), int(cfg.actor_rollout_ref.actor.ppo_mini_batch_size)
    trainer.config, trainer.tokenizer, trainer.processor = cfg, tokenizer, processor
    trainer.vitos = ViToSConfig.from_mapping(OmegaConf.to_container(cfg.vitos))
    trainer.stages = update_stages(trainer.vitos.order)
    trainer.update_steps = trainer.vitos.update_optim_steps(b, mb)
    trainer.min_pixels, trainer.max_pixels = int(dataset.min_pixels), int(dataset.max_pixels)
    trainer.reward_fn = configured_reward_fn(cfg)
    trainer.dumps = GenerationDumps.from_config(cfg, tokenizer, trainer.min_pixels, trainer.max_pixels, verl_logger=None)
    trainer.global_steps = 1
    trainer.use_reference_policy = False
    trainer.async_rollout_manager = RolloutManager()
    trainer.actor_rollout_wg = OneRank()
    trainer.checkpoint_manager = SimpleNamespace(sleep_replicas=lambda: None, update_weights=lambda step: None)
    trainer.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    h.trainer = trainer
    return h


def _box(quadrant: int) -> str:
    return f"<box>{BOX[quadrant]}</box>"


def _answer(colour: str) -> str:
    return f"<think>The disc is {colour}.</think><answer>{colour}</answer>"


def _quadrant(row) -> int:
    return [tuple(map(float, BOX[k][1:-1].split(", "))) for k in range(4)].index(tuple(row["extra_info"]["gt_boxes"][0]))



def direction(h, out: dict) -> None:
    """Mode ``direction`` (module doc)."""
    from verl.utils.dataset.rl_dataset import collate_fn

    # two questions with their evidence in the same quadrant and different answers: box A (the
    # evidence) and box B (the opposite quadrant) are the same two texts in both questions
    first = h.dataset[0]
    rows = [first] + [
        r for r in (h.dataset[i] for i in range(1, len(h.dataset)))
        if _quadrant(r) == _quadrant(first) and r["reward_model"]["ground_truth"] != first["reward_model"]["ground_truth"]
    ][:1]  # fmt: skip
    assert len(rows) == 2, "the task has no second question with the same evidence quadrant"
    quadrant, answers = _quadrant(first), [r["reward_model"]["ground_truth"] for r in rows]

    def policy(q, box_quadrant, k):
        if box_quadrant is None:  # grounding: box A, then box B
            return _box(quadrant if k % 2 == 0 else OPPOSITE[quadrant])
        wrong = "red" if answers[q] != "red" else "blue"
        return _answer(answers[q] if box_quadrant == quadrant else wrong)

    h.policy = policy
    trainer, update = h.trainer, h.trainer._update
    out["streams"] = {}

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
    metrics = trainer.train_step(collate_fn(rows))
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def learn(h, out: dict, steps: int) -> None:
    """Mode ``learn`` (module doc)."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import collate_fn

    trainer = h.trainer
    colours = ["red", "green", "blue", "yellow"]
    n_q = int(h.cfg.data.train_batch_size)
    rows = [h.dataset[i] for i in range(n_q)]
    rng = np.random.default_rng(0)
    out["steps"] = []

    def scores():
        """The policy's probability of each candidate: ``p_box[q, quadrant]``, ``p_ans[q, quadrant, colour]``
        (every box of each question, every answer under each box, scored by the actor)."""
        h.policy = lambda q, quadrant, k: _box(k) if quadrant is None else _answer(colours[k])
        batch = DataProto.from_single_dict(collate_fn(rows))
        batch.non_tensor_batch["uid"] = np.array([f"enum-{len(out['steps'])}-{i}" for i in range(n_q)], dtype=object)
        g, r, plan = trainer.two_pass(batch, {}, 4, 4)
        balance, h.cfg.trainer.balance_batch = h.cfg.trainer.balance_batch, False  # keep the rows in order
        logp = {}
        for name, b in (("grounding", g), ("reasoning", r)):
            b = trainer._prepare(b, {}, name)
            old, _ = trainer._compute_old_log_prob(b)
            mask = b.batch["response_mask"].float()
            logp[name] = (old.batch["old_log_probs"] * mask).sum(-1)
        h.cfg.trainer.balance_batch = balance
        g_text, r_text = trainer._decode(g), trainer._decode(r)
        box_of = [next(k for k in range(4) if t == _box(k)) for t in g_text]  # each grounding row's quadrant
        l_box = torch.full((n_q, 4), float("nan"))
        l_ans = torch.full((n_q, 4, 4), float("nan"))
        for i in range(len(g_text)):
            l_box[i // 4, box_of[i]] = logp["grounding"][i]
        for i, t in enumerate(r_text):
            j = int(plan.box_index[i])
            l_ans[j // 4, box_of[j], next(c for c in range(4) if t == _answer(colours[c]))] = logp["reasoning"][i]
        assert not (l_box.isnan().any() or l_ans.isnan().any()), "a candidate was not scored"
        return torch.softmax(l_box, -1), torch.softmax(l_ans, -1)

    for step in range(steps + 1):
        h.uids.clear()
        h.counts.clear()
        p_box, p_ans = scores()
        right = [(_quadrant(r), colours.index(r["reward_model"]["ground_truth"])) for r in rows]
        record = {
            "step": step,
            "p_right_box": float(np.mean([p_box[q, b].item() for q, (b, _) in enumerate(right)])),
            "p_right_answer": float(np.mean([p_ans[q, b, c].item() for q, (b, c) in enumerate(right)])),
        }
        if step < steps:  # a GRPO step on samples drawn from the policy restricted to the candidates
            h.uids.clear()
            h.counts.clear()

            def policy(q, quadrant, k, p_box=p_box, p_ans=p_ans):
                if quadrant is None:
                    return _box(int(rng.choice(4, p=p_box[q].double().numpy() / p_box[q].double().sum().item())))
                probs = p_ans[q, quadrant].double().numpy()
                return _answer(colours[int(rng.choice(4, p=probs / probs.sum()))])

            h.policy = policy
            trainer.global_steps = step + 1
            metrics = trainer.train_step(collate_fn(rows))
            record.update({k: float(metrics[k]) for k in ("grounding/reward/score", "reasoning/reward/score",
                                                        "grounding/reward/iou", "reasoning/reward/acc")})  # fmt: skip
        out["steps"].append(record)
        print(json.dumps(record), flush=True)


def freeze(h, out: dict) -> None:
    """Mode ``freeze``: one dual-stream step with varied boxes and answers; how far each actor
    parameter moved (vision tower and the rest) and whether any vision parameter still needs a gradient."""
    from verl.utils.dataset.rl_dataset import collate_fn

    colours = ["red", "green", "blue", "yellow"]
    h.policy = lambda q, quadrant, k: _box(k % 4) if quadrant is None else _answer(colours[(k + q) % 4])
    module = h.actor.actor.engine.module

    def full(p):
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()

    before = {n: full(p) for n, p in module.named_parameters()}
    n_q = int(h.cfg.data.train_batch_size)
    h.trainer.train_step(collate_fn([h.dataset[i] for i in range(n_q)]))
    moved = {n: float((full(p) - before[n]).abs().max()) for n, p in module.named_parameters()}
    visual = [n for n in moved if "visual" in n.split(".")]
    out["visual_max_change"] = max(moved[n] for n in visual)
    out["other_max_change"] = max(v for n, v in moved.items() if n not in visual)
    out["visual_params"] = len(visual)
    out["visual_requires_grad"] = any(p.requires_grad for n, p in module.named_parameters() if n in visual)


def logits(h, out: dict) -> None:
    """Mode ``logits``: one step's two streams (a scripted policy with answers of several lengths)
    through the actor's forward with the response-only LM head of ``vitos_verl.compat.verl_0_9``
    and with verl's full-sequence one: the response log-probs and entropies of both, and the time."""
    import time

    import numpy as np
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import collate_fn

    from vitos_verl.compat import verl_0_9

    colours = ["red", "green", "blue", "yellow"]
    h.policy = lambda q, quadrant, k: _box(k) if quadrant is None else (
        _answer(colours[k]) if k % 2 else f"<answer>{colours[k]}</answer>")  # fmt: skip
    trainer = h.trainer
    n_q = int(h.cfg.data.train_batch_size)
    batch = DataProto.from_single_dict(collate_fn([h.dataset[i] for i in range(n_q)]))
    batch.non_tensor_batch["uid"] = np.array([f"q{i}" for i in range(n_q)], dtype=object)
    g, r, _ = trainer.two_pass(batch, {}, 4, 4)
    runs = {}
    for name, install in (("response_only", verl_0_9.install_worker), ("verl", verl_0_9.uninstall_worker)):
        install()
        runs[name] = {}
        for stream, b in (("grounding", g), ("reasoning", r)):
            b = trainer._prepare(b.slice(0, len(b)), {}, stream)
            t0 = time.perf_counter()
            old, _ = trainer._compute_old_log_prob(b)
            mask = b.batch["response_mask"].bool()
            runs[name][stream] = {"seconds": time.perf_counter() - t0, "log_probs": old.batch["old_log_probs"][mask],
                                  "entropy": old.batch["entropys"][mask], "tokens": int(mask.sum())}  # fmt: skip
    for stream in ("grounding", "reasoning"):
        a, v = runs["response_only"][stream], runs["verl"][stream]
        out[stream] = {
            "tokens": a["tokens"],
            "max_abs_diff_log_probs": float((a["log_probs"] - v["log_probs"]).abs().max()),
            "max_abs_diff_entropy": float((a["entropy"] - v["entropy"]).abs().max()),
            "mean_log_prob": float(v["log_probs"].float().mean()),
            "seconds": {k: runs[k][stream]["seconds"] for k in runs},
            "all_zero": bool((a["log_probs"] == 0).all()),
        }


def main(mode: str, out_path: str, data_dir: str, model_dir: str, *overrides: str) -> None:
    steps = 0
    if mode == "learn":
        steps = int(os.environ.get("LEARN_STEPS", "8"))
    elif mode not in ("direction", "logits", "freeze"):
        raise SystemExit(f"unknown mode {mode!r}: direction | learn | logits | freeze")
    h = harness(os.path.dirname(out_path), data_dir, model_dir, list(overrides))
    out: dict = {"mode": mode}
    {"direction": lambda: direction(h, out), "learn": lambda: learn(h, out, steps), "logits": lambda: logits(h, out),
     "freeze": lambda: freeze(h, out)}[mode]()  # fmt: skip
    h.loop.close()
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
