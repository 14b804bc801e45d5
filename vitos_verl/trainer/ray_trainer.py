"""The dual-stream GRPO trainer: verl's ``RayPPOTrainer`` with ViToS's training step.

One step (docs/design.md section 1, item 5), each stage timed as ``timing_s/<stage>``:

1. ``gen_grounding``: ``n_g`` boxes per question on the full image (verl's agent loop, vLLM).
2. ``prune``: each box becomes a keep mask (:func:`vitos_verl.pruning.plan.plan`, through
   :func:`vitos_verl.trainer.dual_stream.plan_frames`).
3. ``gen_reasoning``: ``n_r`` answers per box on the kept visual tokens (agent loop
   ``vitos_pruned``; the vLLM plugin prunes the prompt).
4. ``reward``: reasoning rewards from verl's reward loop; grounding rewards here, with the
   answers' accuracy fed back into each box (``w_fb``). Both streams call the one configured
   function (``reward.custom_reward_function``, :func:`~vitos_verl.trainer.dual_stream.configured_reward_fn`),
   told apart by ``extra_info["stream"]``.
5. ``old_log_prob`` / ``ref``: both streams through the actor (and reference), on the same
   pruned inputs the rollout saw; a stream this run does not update (``vitos.update_streams``)
   skips both passes (only its update reads them).
6. ``adv``: GRPO advantages normalised within each stream's groups (a question's ``n_g`` boxes;
   its ``n_g * n_r`` answers).
7. ``update_<stream>``: one actor update per entry of ``vitos.order`` (``grounding_first``:
   grounding, then reasoning; ``joint``: one update on both, the summed-loss ablation), restricted
   to ``vitos.update_streams`` (``[grounding]``: a stage-1 run of the two-stage schedule,
   ``[reasoning]``: stage 2; both streams are still generated, scored and logged;
   :func:`~vitos_verl.trainer.streams.update_stages`; ``<stream>/updated`` says which).
   Old log-probs of both streams are computed before the first update (the behaviour policy),
   so the second update's PPO ratio corrects for the first update's change. Each update takes
   ``vitos.optim_steps`` optimiser steps per PPO epoch (equal by default;
   :mod:`vitos_verl.trainer.optim_steps`), logged as ``actor/<update>/optim_steps``.
8. ``update_weights`` to vLLM, ``save_checkpoint`` every ``trainer.save_freq``, two-pass
   validation every ``trainer.test_freq``, both at the last step however the loop ends
   (:mod:`vitos_verl.trainer.loop`); verl's timing/throughput metrics per stream
   (:mod:`vitos_verl.trainer.perf`).

Before the updates, both streams' samples go to ``trainer.rollout_data_dir`` as JSONL; each
validation's to ``trainer.validation_data_dir``, and ``trainer.log_val_generations`` of them to
the tracking backends as a table (:mod:`vitos_verl.trainer.rollout_dump`).

Workers, resource pools, checkpointing (``trainer.resume_mode``), tracking and the dataloader
state are verl's; only the step and validation are ViToS's. A sample whose rollout or reward
failed is counted (``<stream>/failed/*``), left out of the reward means and given zero advantage
and loss weight (:mod:`vitos_verl.trainer.faults`); checkpoints get a completeness marker and an
atomic resume tracker (:mod:`vitos_verl.trainer.checkpoint`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm
from verl import DataProto
from verl.protocol import pad_dataproto_to_divisor, unpad_dataproto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.metric_utils import compute_data_metrics
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage, compute_response_mask
from verl.utils.checkpoint.checkpoint_manager import should_save_ckpt_esi
from verl.utils.debug import marked_timer
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking

from vitos_verl.compat import verl_0_9
from vitos_verl.pruning import KEEP_ALL, KEEP_KWARG
from vitos_verl.records import AGENT_NAME
from vitos_verl.rewards.score import SCORE_KEYS
from vitos_verl.trainer.checkpoint import check_resume, save_with_atomic_tracker
from vitos_verl.trainer.checks import check_grounding_budget, check_grounding_prompt, check_reward_kwargs
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.dual_stream import (
    configured_reward_fn,
    grounding_rewards,
    last_token_scores,
    plan_frames,
    row_frames,
    sample_frames,
    stream_metrics,
    with_stream,
)
from vitos_verl.trainer.faults import check_not_all_failed, failed_mask, fault_metrics, mask_failed, mask_malformed
from vitos_verl.trainer.loop import final_actions, last_step, step_actions
from vitos_verl.trainer.optim_steps import LR_STEP_KEY, MINI_BATCH_KEY, mini_batch_size, optim_steps_taken
from vitos_verl.trainer.perf import step_perf_metrics, stream_perf_metrics
from vitos_verl.trainer.rollout_dump import GenerationDumps
from vitos_verl.trainer.stages import START_RECORD, record_start
from vitos_verl.trainer.vit_cache_metrics import vit_cache_step_metrics

_META_KEYS = ("data_source", "reward_model", "extra_info", "uid")


def _object_array(values) -> np.ndarray:
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class ViToSRayTrainer(verl_0_9.TrainerHooks, RayPPOTrainer):
    """verl's PPO trainer whose step is ViToS's two streams (see module doc).

    Config: verl's ``ppo_trainer`` plus the ``vitos`` block (:class:`ViToSConfig`);
    ``actor_rollout_ref.rollout.n`` must equal ``vitos.n_g`` (the grounding group size); each
    update's mini-batches are its samples over its ``vitos.optim_steps``, not verl's
    ``ppo_mini_batch_size * rollout.n``.

    Raises:
        ValueError: at construction, for an invalid ``vitos`` block, ``rollout.n != n_g``, a
            ``data.grounding_max_pixels`` other than ``vitos.grounding_max_pixels``, reward kwargs
            that differ from ``vitos`` (the reward loop and the driver would score differently), or
            a dataset without the reasoning chat.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        verl_0_9.install()  # equal-length batches of M-RoPE position ids (vitos_verl.compat.verl_0_9)
        self.vitos = ViToSConfig.from_mapping(OmegaConf.to_container(self.config.vitos, resolve=True))
        self.stages = self.vitos.stages()  # vitos.order restricted to vitos.update_streams
        rollout = self.config.actor_rollout_ref.rollout
        if int(rollout.n) != self.vitos.n_g:
            raise ValueError(f"actor_rollout_ref.rollout.n={rollout.n} must equal vitos.n_g={self.vitos.n_g}")
        self.vitos.check_batch(int(self.config.data.train_batch_size), int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size))
        # optimiser steps per PPO epoch of each update (vitos.optim_steps; vitos_verl.trainer.optim_steps)
        self.update_steps = self.vitos.update_optim_steps(
            int(self.config.data.train_batch_size), int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size)
        )
        self.min_pixels, self.max_pixels = int(self.train_dataset.min_pixels), int(self.train_dataset.max_pixels)
        self.vitos.grounding_pixels(self.min_pixels, self.max_pixels)  # raises for a budget above max_pixels
        check_grounding_budget(self.config)  # the dataset's grounding budget is the vitos one
        check_grounding_prompt(self.config)  # the dataset's grounding prompt asks what the trainer reads
        prompt = getattr(self.train_dataset, "grounding_prompt", None)
        if prompt is not None and (prompt.box_format, prompt.answer) != (self.vitos.box_format, self.vitos.grounding_answer):
            raise ValueError(
                f"the dataset's grounding prompt ({prompt}) is not the vitos block's (box_format={self.vitos.box_format!r}, "
                f"answer={self.vitos.grounding_answer}): set vitos.box_format / vitos.w_acc only"
            )
        check_reward_kwargs(self.config)
        # the configured reward function, as verl's reward loop loads it for the reasoning stream
        self.reward_fn = configured_reward_fn(self.config)
        # rollout/validation JSONL and the validation table (verl's _dump_generations and
        # _maybe_log_val_generations, per stream)
        self.dumps = GenerationDumps.from_config(
            self.config, self.tokenizer, *self.vitos.grounding_pixels(self.min_pixels, self.max_pixels),
            verl_logger=self.validation_generations_logger,
        )

    # ------------------------------------------------------------------ rollout
    def _generate(self, gen: DataProto, timing: dict, name: str) -> DataProto:
        pad_to = int(self.config.actor_rollout_ref.rollout.agent.num_workers)
        padded, pad = pad_dataproto_to_divisor(gen, pad_to)
        out = self.async_rollout_manager.generate_sequences(padded)
        for k, v in out.meta_info.pop("timing", {}).items():
            timing[f"{name}/{k}"] = v
        return unpad_dataproto(out, pad_size=pad)

    def _stream_input(self, raw_prompt, meta: dict[str, np.ndarray], vitos_keep, meta_info: dict) -> DataProto:
        n = len(raw_prompt)
        non_tensor = {
            "raw_prompt": _object_array(raw_prompt),
            "agent_name": np.array([AGENT_NAME] * n, dtype=object),
            KEEP_KWARG: _object_array(vitos_keep),
            "index": np.arange(n),
            **meta,
        }
        return DataProto.from_dict(
            tensors={"dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8)}, non_tensors=non_tensor, meta_info=meta_info
        )

    def two_pass(self, batch: DataProto, timing: dict, n_g: int, n_r: int, validate: bool = False):
        """Grounding rollout → prune → reasoning rollout (training and validation alike).

        Args:
            batch: dataloader rows (``raw_prompt`` = grounding chat, ``raw_reasoning_prompt``,
                ``data_source``, ``reward_model``, ``extra_info``, ``uid``).

        Returns:
            ``(grounding, reasoning, plan)``: verl batches of ``B * n_g`` and ``B * n_g * n_r``
            samples (rollout outputs united with the rows' reward fields; ``uid`` is the
            question's in both) and the :class:`~vitos_verl.trainer.dual_stream.ReasoningPlan`.

        Raises:
            ValueError: rows without ``raw_reasoning_prompt`` (data not from ``data_prep``).
        """
        nt = batch.non_tensor_batch
        if "raw_reasoning_prompt" not in nt:
            raise ValueError("dataset rows need the reasoning chat (column reasoning_prompt; see data_prep)")
        # frames: the grounding stream's (grounding_max_pixels: low-resolution grounding) and the reasoning one's
        budget = (self.min_pixels, self.max_pixels, self.vitos.grounding_max_pixels)
        frames = row_frames(nt["extra_info"], *budget)
        info = [{**dict(e), "resized_size": list(f.grounding.resized_size)} for e, f in zip(nt["extra_info"], frames)]
        r_info = [{**dict(e), "resized_size": list(f.reasoning.resized_size)} for e, f in zip(nt["extra_info"], frames)]
        meta_info = {"global_steps": self.global_steps, "validate": validate}
        if validate:
            meta_info.update(eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        rows = np.repeat(np.arange(len(batch)), n_g)
        meta_g = {k: nt[k][rows] for k in _META_KEYS if k != "extra_info"}
        meta_g["extra_info"] = with_stream([info[i] for i in rows], "grounding")
        with marked_timer("gen_grounding", timing, color="red"):
            g_in = self._stream_input(nt["raw_prompt"][rows], meta_g, [KEEP_ALL] * len(rows), meta_info)
            g_out = self._generate(g_in, timing, "gen_grounding")
        g = g_out
        g.non_tensor_batch.update(meta_g)
        g.non_tensor_batch["box_index"] = np.arange(len(g))  # each sample's own box (as the reasoning samples')

        with marked_timer("prune", timing, color="yellow"):
            texts = self._decode(g)
            image_sizes = [info[i]["image_size"] for i in rows]
            # each sample's grounding frame is the grid the processor gave it (the frame of its boxes)
            g_frames = sample_frames(g.non_tensor_batch["multi_modal_inputs"], image_sizes, *budget)
            plan = plan_frames(texts, g_frames, nt["raw_reasoning_prompt"][rows], self.vitos, n_r=n_r)
        r_rows = rows[plan.box_index]
        meta_r = {k: nt[k][r_rows] for k in _META_KEYS if k != "extra_info"}
        meta_r["extra_info"] = _object_array(
            {**e, "keep_ratio": float(k)} for e, k in zip(with_stream([r_info[i] for i in r_rows], "reasoning"), plan.keep_ratio)
        )
        with marked_timer("gen_reasoning", timing, color="red"):
            r_in = self._stream_input(plan.raw_prompt, meta_r, plan.vitos_keep, meta_info)
            r = self._generate(r_in, timing, "gen_reasoning")
        r.non_tensor_batch.update(meta_r)
        r.non_tensor_batch["box_index"] = plan.box_index
        r.non_tensor_batch["keep_ratio"] = plan.keep_ratio.astype(np.float64)
        return g, r, plan

    def _decode(self, b: DataProto) -> list[str]:
        resp, mask = b.batch["responses"], b.batch["response_mask"].bool()
        return self.tokenizer.batch_decode([ids[m] for ids, m in zip(resp, mask)], skip_special_tokens=True)

    # ------------------------------------------------------------------ rewards
    def _rewards_with_cross_feedback(self, g: DataProto, r: DataProto, plan) -> dict[str, dict[str, np.ndarray]]:
        """Token-level scores of both streams (``token_level_scores`` / ``token_level_rewards``): the
        reasoning stream's from the reward loop, the grounding stream's with its answers' accuracy
        credited to each box (cross-feedback, :func:`vitos_verl.trainer.dual_stream.grounding_rewards`)."""
        r_scores = {k: np.asarray(r.non_tensor_batch[k], dtype=np.float64) for k in SCORE_KEYS}
        r.batch["token_level_scores"] = r.batch.pop("rm_scores").float()
        nt = g.non_tensor_batch
        ok = ~failed_mask(r.non_tensor_batch, len(r))  # a failed answer is no evidence about its box
        g_scores = grounding_rewards(
            nt["data_source"],
            plan.grounding_texts,
            [rm.get("ground_truth", "") for rm in nt["reward_model"]],
            nt["extra_info"],
            r_scores["acc"][ok],
            plan.box_index[ok],
            self.reward_fn,
            keep_ratios=plan.grounding_keep_ratios(),
        )
        g.batch.pop("rm_scores", None)
        g.batch["token_level_scores"] = last_token_scores(g_scores["score"], g.batch["response_mask"])
        for k, v in g_scores.items():
            nt[k] = v
        if self.vitos.shuffle_rewards:  # the control run: rewards unrelated to their samples
            rng = np.random.default_rng(self.global_steps)
            for b in (g, r):
                s = b.batch["token_level_scores"].sum(-1).numpy()
                b.batch["token_level_scores"] = last_token_scores(s[rng.permutation(len(s))], b.batch["response_mask"])
        for b in (g, r):
            b.batch["token_level_rewards"] = b.batch["token_level_scores"]
        return {"grounding": g_scores, "reasoning": r_scores}

    # ------------------------------------------------------------------ actor
    def _prepare(self, b: DataProto, metrics: dict, stream: str) -> DataProto:
        if "response_mask" not in b.batch.keys():
            b.batch["response_mask"] = compute_response_mask(b)
        if self.config.trainer.balance_batch:
            self.balance_batch(b, metrics, f"{stream}/global_seqlen")
        b.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        b.meta_info["global_token_num"] = torch.sum(b.batch["attention_mask"], dim=-1).tolist()
        b.meta_info["images_seqlens"] = [
            int(s) for mm in b.non_tensor_batch["multi_modal_inputs"] if "images_seqlens" in mm for s in mm["images_seqlens"].tolist()
        ]
        return b

    def _log_probs_and_advantages(self, b: DataProto, metrics: dict, stream: str, timing: dict, update: bool = True) -> DataProto:
        """Old log-probs, reference log-probs and GRPO advantages of one stream's batch.

        Args:
            update: whether this run updates the stream (``vitos.update_streams``). ``False``
                skips the old-log-prob and reference passes (only the stream's update reads them)
                and computes the advantages alone (cheap, on the driver; logged and dumped).
        """
        if update:
            b = self._old_and_ref(b, metrics, stream, timing)
        with marked_timer(f"adv/{stream}", timing, color="brown"):
            # failed samples: out of their GRPO group and out of the loss (vitos_verl.trainer.faults)
            uid = mask_failed(b, failed_mask(b.non_tensor_batch, len(b)))
            b = compute_advantage(
                b,
                adv_estimator=self.config.algorithm.adv_estimator,
                gamma=self.config.algorithm.gamma,
                lam=self.config.algorithm.lam,
                num_repeat=self.config.actor_rollout_ref.rollout.n,
                norm_adv_by_std_in_grpo=self.config.algorithm.get("norm_adv_by_std_in_grpo", True),
                config=self.config.algorithm,
            )
            b.non_tensor_batch["uid"] = uid
            if self.vitos.mask_malformed:
                metrics[f"{stream}/masked_malformed"] = mask_malformed(b)
        return b

    def _old_and_ref(self, b: DataProto, metrics: dict, stream: str, timing: dict) -> DataProto:
        with marked_timer(f"old_log_prob/{stream}", timing, color="blue"):
            old, mfu = self.old_log_prob(b)
            metrics[f"{stream}/perf/mfu/actor_infer"] = mfu
            ent = agg_loss(
                loss_mat=old.batch["entropys"],
                loss_mask=b.batch["response_mask"],
                loss_agg_mode=self.config.actor_rollout_ref.actor.loss_agg_mode,
            )
            metrics[f"{stream}/entropy"] = float(ent.detach().item())
            old.batch.pop("entropys")
            b = b.union(old)
        if self.use_reference_policy:
            with marked_timer(f"ref/{stream}", timing, color="olive"):
                b = b.union(self.ref_log_prob(b))
        return b

    def _update(self, batches: dict[str, DataProto], metrics: dict, timing: dict) -> None:
        for stage in self.stages:
            name = "+".join(stage)
            parts = [batches[s] for s in stage]
            if len(parts) > 1:  # joint: one loss over both streams' samples
                keys = set.intersection(*(set(p.non_tensor_batch) for p in parts))
                tensor_keys = set.intersection(*(set(p.batch.keys()) for p in parts))
                for p in parts:
                    p.pop(batch_keys=list(set(p.batch.keys()) - tensor_keys), non_tensor_batch_keys=list(set(p.non_tensor_batch) - keys))
                    p.meta_info.pop("images_seqlens", None)
                    p.meta_info.pop("global_token_num", None)
                b = DataProto.concat(parts)
                b.meta_info["global_token_num"] = torch.sum(b.batch["attention_mask"], dim=-1).tolist()
            else:
                b = parts[0]
            # this update's mini-batch: its samples over its optimiser steps (the ViToS worker's update_actor)
            b.meta_info[MINI_BATCH_KEY] = mini_batch_size(len(b), self.update_steps[name], name)
            # the LR scheduler advances once per ViToS step: on its last update only
            b.meta_info[LR_STEP_KEY] = stage == self.stages[-1]
            with marked_timer(f"update/{name}", timing, color="red"):
                out = self.update_actor(b)
            b.meta_info.pop(MINI_BATCH_KEY)
            b.meta_info.pop(LR_STEP_KEY)
            raw = out.meta_info["metrics"]
            metrics[f"actor/{name}/optim_steps"] = optim_steps_taken(raw)
            # actor/<k> -> actor/<update>/<k>; verl's perf/mfu/actor -> <update>/perf/mfu/actor
            for k, v in reduce_metrics(raw).items():
                metrics[k.replace("actor/", f"actor/{name}/", 1) if k.startswith("actor/") else f"{name}/{k}"] = v

    # ------------------------------------------------------------------ step
    def train_step(self, batch_dict: dict, save: bool = False) -> dict[str, Any]:
        """One ViToS step on a dataloader batch; returns the metrics to log.

        Args:
            batch_dict: a dataloader batch (``train_batch_size`` questions).
            save: checkpoint this step (after the updates, before the weights go to vLLM, as verl).

        Returns:
            The step's metrics, among them verl's timing/throughput metrics per stream
            (``<stream>/timing_per_token_ms/*``, ``<stream>/perf/*``; :mod:`vitos_verl.trainer.perf`)
            and of the whole step (``perf/*``).
        """
        metrics: dict[str, Any] = {}
        timing: dict[str, float] = {}
        batch = DataProto.from_single_dict(batch_dict)
        batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
        with marked_timer("step", timing):
            g, r, plan = self.two_pass(batch, timing, self.vitos.n_g, self.vitos.n_r)
            metrics.update(vit_cache_step_metrics(self))  # rollout/vit_cache/*, before the replicas sleep
            self.checkpoint_manager.sleep_replicas()
            with marked_timer("reward", timing, color="yellow"):
                self._rewards_with_cross_feedback(g, r, plan)
            streams = {"grounding": g, "reasoning": r}
            updated = {s for stage in self.stages for s in stage}  # vitos.update_streams
            for name, b in streams.items():
                check_not_all_failed(name, b.non_tensor_batch, len(b))
            for name, b in streams.items():
                b = self._prepare(b, metrics, name)  # may reorder the samples: read scores after it
                metrics.update(
                    stream_metrics(
                        name,
                        {k: b.non_tensor_batch[k] for k in SCORE_KEYS},
                        b.non_tensor_batch["uid"],
                        b.batch["attention_mask"][:, : b.batch["prompts"].shape[1]].sum(-1).tolist(),
                        b.batch["response_mask"].sum(-1).tolist(),
                        failed=failed_mask(b.non_tensor_batch, len(b)),
                    )
                )
                metrics.update(fault_metrics(name, b.non_tensor_batch, len(b)))
                streams[name] = self._log_probs_and_advantages(b, metrics, name, timing, update=name in updated)
                metrics[f"{name}/updated"] = float(name in updated)
                metrics.update({f"{name}/{k}": v for k, v in compute_data_metrics(streams[name], use_critic=False).items()})
            if self.dumps.rollout_dir:
                with marked_timer("dump_rollout_generations", timing, color="green"):
                    self.dumps.training_step(self.global_steps, streams, plan)
            self._update(streams, metrics, timing)
            if save:
                with marked_timer("save_checkpoint", timing, color="green"):
                    self.save_checkpoint()
            with marked_timer("update_weights", timing, color="red"):
                self.checkpoint_manager.update_weights(self.global_steps)
        g_tok = metrics["grounding/prompt_tokens/mean"]
        metrics["vitos/prompt_token_ratio"] = metrics["reasoning/prompt_tokens/mean"] / max(g_tok, 1.0)
        metrics["vitos/keep_ratio"] = float(np.mean(plan.keep_ratio))
        metrics["vitos/box_parsed"] = float(np.mean(plan.parsed))
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        n_gpus = self.resource_pool_manager.get_n_gpus()
        for name, b in streams.items():
            metrics.update(stream_perf_metrics(name, b, timing, n_gpus))
        metrics.update(step_perf_metrics(streams, timing, n_gpus))
        metrics.update(self.dumps.metrics())
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self):
        """verl 0.9.1's save, then a completeness marker and an atomic resume tracker.

        See :func:`vitos_verl.trainer.checkpoint.save_with_atomic_tracker`: a save interrupted at
        any point leaves the tracker at the previous complete step.
        """
        save_with_atomic_tracker(super().save_checkpoint, self.config.trainer.default_local_dir, self.global_steps)

    def load_checkpoint(self):
        """verl 0.9.1's load, after :func:`vitos_verl.trainer.checkpoint.check_resume`.

        Raises:
            CheckpointError: a tracker that is not a number or names a missing or incomplete
                step folder, or an incomplete ``trainer.resume_from_path`` (never a silent
                restart from step 0).
        """
        check_resume(self.config.trainer)
        return super().load_checkpoint()

    def run_dir(self) -> Path:
        """Where this run's logs go: the parent of ``trainer.default_local_dir`` (the checkpoints)."""
        return Path(self.config.trainer.default_local_dir).absolute().parent

    def _tracker(self) -> Tracking:
        """verl 0.9.1's ``Tracking`` with its file and tensorboard output in this run's folder.

        verl's file backend writes ``$VERL_FILE_LOGGER_PATH``, else ``./<project>/<experiment>.jsonl``
        under the Ray worker's cwd (a ``vitos/`` folder at the top of the work tree), opened with
        "wb"; the tensorboard one ``$TENSORBOARD_DIR``, else ``./tensorboard_log/...``. Both are
        set here, always (an inherited value is replaced), to a per-launch place in
        :meth:`run_dir`, so nothing is written outside the run's folder and a resumed run writes a
        new file instead of erasing the metrics of the steps before the checkpoint.
        """
        run_dir = self.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = run_dir / f"metrics-{stamp}.jsonl"
        n = 1
        while path.exists():  # a second launch within the same second
            path, n = run_dir / f"metrics-{stamp}-{n}.jsonl", n + 1
        os.environ["VERL_FILE_LOGGER_PATH"] = str(path)
        os.environ["TENSORBOARD_DIR"] = str(run_dir / "tensorboard")
        return Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=self.config.trainer.logger,
            config=OmegaConf.to_container(self.config, resolve=True),
        )

    def _record_start(self) -> None:
        """``<run>/vitos_start.json`` at step 0: the model this run started from (the two-stage
        check reads it: :mod:`vitos_verl.trainer.stages`). Never stops training."""
        model = OmegaConf.select(self.config, "actor_rollout_ref.model.path")
        if model is None or OmegaConf.select(self.config, "trainer.default_local_dir") is None:
            return
        try:
            record_start(self.run_dir(), str(model), self.global_steps)
        except (OSError, ValueError) as exc:
            print(f"ViToS: could not write {START_RECORD} in {self.run_dir()}: {type(exc).__name__}: {exc}")

    def fit(self):
        """The training loop: resume, validate, then :meth:`train_step` up to the last step.

        A run that starts at step 0 records the model it started from (``<run>/vitos_start.json``,
        :func:`~vitos_verl.trainer.stages.record_start`). The last step is ``total_training_steps``, or where ``trainer.total_epochs`` of the
        dataloader run out if that comes first (:func:`~vitos_verl.trainer.loop.last_step`).
        Checkpoints and validations follow verl 0.9.1's ``save_freq`` / ``test_freq`` / ESI rules
        (:func:`~vitos_verl.trainer.loop.step_actions`), the last step included; a loop that stops
        before it (the dataloader yields fewer batches than its length) saves and validates the
        step it reached unless that step already was (:func:`~vitos_verl.trainer.loop.final_actions`).
        """
        tracker = self.tracking = self._tracker()  # validate logs its generations table through it
        trainer = self.config.trainer
        self.global_steps = 0
        self.load_checkpoint()
        self._record_start()
        self.checkpoint_manager.update_weights(self.global_steps)
        if trainer.get("val_before_train", True) and self.val_dataloader is not None:
            tracker.log(data=self.validate(), step=self.global_steps)
            if trainer.get("val_only", False):
                return
        last = last_step(self.total_training_steps, len(self.train_dataloader), trainer.total_epochs)
        if last < self.total_training_steps:
            print(
                f"ViToS: {len(self.train_dataloader)} batches x trainer.total_epochs={trainer.total_epochs} end the run "
                f"at step {last}, before trainer.total_training_steps={self.total_training_steps}"
            )
        if self.global_steps >= last:
            print(
                f"ViToS: checkpoint at step {self.global_steps} already reaches the last step {last} "
                f"(trainer.total_training_steps={self.total_training_steps}); raise it to continue training"
            )
            return
        saved = validated = self.global_steps
        self.max_steps_duration = 0.0
        start_epoch = self.global_steps // len(self.train_dataloader)
        bar = tqdm(total=last, initial=self.global_steps, desc="ViToS steps")
        for epoch in range(start_epoch, trainer.total_epochs):
            for batch_dict in self.train_dataloader:
                self.global_steps += 1
                esi = should_save_ckpt_esi(self.max_steps_duration, redundant_time=trainer.get("esi_redundant_time", 0))
                todo = step_actions(self.global_steps, last, trainer.save_freq, trainer.test_freq, esi_expiring=esi)
                metrics = self.train_step(batch_dict, save=todo.save)
                self.max_steps_duration = max(self.max_steps_duration, metrics.get("timing_s/step", 0.0))
                saved = self.global_steps if todo.save else saved
                if todo.validate:
                    metrics.update(self.validate())
                    validated = self.global_steps
                metrics.update({"training/global_step": self.global_steps, "training/epoch": epoch})
                tracker.log(data=metrics, step=self.global_steps)
                bar.update(1)
                if self.global_steps >= last:
                    bar.close()
                    return
        bar.close()
        print(f"ViToS: the dataloader ran out at step {self.global_steps}, before the last step {last}")
        todo = final_actions(self.global_steps, saved, validated, trainer.save_freq, trainer.test_freq)
        if todo.save:  # as in train_step: the actor saves while vLLM sleeps, then vLLM gets the weights back
            self.checkpoint_manager.sleep_replicas()
            self.save_checkpoint()
            self.checkpoint_manager.update_weights(self.global_steps)
        if todo.validate:
            tracker.log(data=self.validate(), step=self.global_steps)

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Two-pass inference on the val split (one box, one answer per question, ``val_kwargs``).

        Returns ``val/<data_source>/acc``, ``val/<data_source>/iou`` (rows with boxes),
        ``val/keep_ratio``, ``val/prompt_token_ratio`` and the other reward keys. Writes the
        samples to ``trainer.validation_data_dir`` and logs ``trainer.log_val_generations`` of
        them (:class:`~vitos_verl.trainer.rollout_dump.GenerationDumps`; ``val/dump_errors``).
        """
        acc: dict[str, list[float]] = defaultdict(list)
        faults: dict[str, float] = defaultdict(float)  # failed samples score 0 and stay in the means
        timing: dict[str, float] = {}
        n_rows = 0
        for batch_dict in self.val_dataloader:
            batch = DataProto.from_single_dict(batch_dict)
            batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
            g, r, plan = self.two_pass(batch, timing, 1, 1, validate=True)
            self.dumps.validation_batch(self.global_steps, {"grounding": g, "reasoning": r}, plan)
            n_rows += len(batch)
            for name, b in (("grounding", g), ("reasoning", r)):
                for k, v in fault_metrics(f"val/{name}", b.non_tensor_batch, len(b)).items():
                    faults[k] += v
            prompt_len = g.batch["prompts"].shape[1]
            g_tok = g.batch["attention_mask"][:, :prompt_len].sum(-1).double()
            r_tok = r.batch["attention_mask"][:, :prompt_len].sum(-1).double()
            for i, ds in enumerate(r.non_tensor_batch["data_source"]):
                for k in ("acc", "f1", "format"):
                    acc[f"val/{ds}/{k}"].append(float(r.non_tensor_batch[k][i]))
                acc[f"val/{ds}/keep_ratio"].append(float(plan.keep_ratio[i]))
                if g.non_tensor_batch["has_gt_box"][i]:
                    acc[f"val/{ds}/iou"].append(float(g.non_tensor_batch["iou"][i]))
                acc["val/acc"].append(float(r.non_tensor_batch["acc"][i]))
                acc["val/keep_ratio"].append(float(plan.keep_ratio[i]))
                acc["val/box_parsed"].append(float(plan.parsed[i]))
                acc["val/grounding/prompt_tokens"].append(float(g_tok[i]))
                acc["val/reasoning/prompt_tokens"].append(float(r_tok[i]))
        out = {k: float(np.mean(v)) for k, v in acc.items()}
        if n_rows:
            out["val/prompt_token_ratio"] = out["val/reasoning/prompt_tokens"] / max(out["val/grounding/prompt_tokens"], 1.0)
            out["val/rows"] = float(n_rows)
            out.update(faults)
        out.update({f"timing_s/val/{k}": v for k, v in timing.items()})
        out.update(self.dumps.validation_end(self.global_steps, getattr(self, "tracking", None)))
        return out
