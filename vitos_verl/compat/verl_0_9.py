"""Hooks into verl 0.9.1 (``recipes/REQUIRED_VERSIONS.txt``).

``left_right_2_no_padding`` (``verl/workers/utils/padding.py``, imported by name into
``verl/trainer/ppo/ray_trainer.py``, where the driver converts every batch it sends to the actor
and reference workers) builds Qwen2.5-VL's M-RoPE ``position_ids`` (``(B, 4, L)``) as a jagged
NestedTensor with ``torch.nested.as_nested_tensor``, which infers the ragged dimension from the
shapes: when every sample of the batch has the same valid length (a batch of one, or a converged
policy whose samples are the same length), it picks the 4 M-RoPE components instead of the
tokens. verl's workers then set ``_ragged_idx = 2`` on it (``maybe_fix_3d_position_ids``) and the
next ``unbind`` fails ("split_with_sizes expects split_sizes to sum exactly to ..."): a training
step with equal-length samples crashes. Upstream: verl issue 7899 (open in the record of
2026-09; proposed fixes PR 7349, closed unmerged, and PR 7901, open; docs/upstream.md row V1).
:func:`install` wraps the driver's function so that 3-D position ids are rebuilt with verl's own
``nested_tensor_from_tensor_list(..., ragged_idx=2)``, as those pull requests do.

``FSDPEngineWithLMHead.prepare_model_inputs`` / ``prepare_model_outputs``
(``verl/workers/engine/fsdp/transformer_impl.py``) and verl's Qwen2.5-VL forward
(``verl/models/transformers/qwen2_vl.py`` ``forward_with_normal_backend``, which verl's
``apply_monkey_patch`` installs): without remove-padding (the CPU recipes and GPU hosts without
flash-attn), verl 0.9.1 computes the LM head, a log-softmax over the 151,665-token vocabulary and
the entropy at *every* position of prompt and response, then keeps the response's. With a
64-token image, a 40-token text prompt and 32 response tokens, about three quarters of that is
discarded, and for a small policy it is most of the actor's time. :func:`install_worker` makes the
actor and reference forward compute them only from the first position any sample's response
needs (the right-padded batch's ``min(seq_len) - max_response_len - 1``) and fills the earlier
positions with log-prob 0 and entropy 0, which verl then drops with the prompt
(``no_padding_2_padding``). Response log-probs and entropies equal verl's
(``tests/test_compat.py``); any other configuration (remove-padding, fused kernels,
distillation, the Σπ² statistic) goes through verl's code unchanged. verl's SFT trainer goes
through the same two engine methods: :func:`install_sft` (``vitos_verl.trainer.sft_warmstart``)
starts its LM head at the loss mask's first token less one, and its loss equals verl's.
"""

from __future__ import annotations

import contextlib
import functools

import torch

VERL_VERSION = "0.9.1"
_MARK = "_vitos_mrope_fix"


def _fixed(original):
    @functools.wraps(original)
    def left_right_2_no_padding(data):
        position_ids, attention_mask = data["position_ids"], data["attention_mask"]
        out = original(data)
        if isinstance(position_ids, torch.Tensor) and not position_ids.is_nested and position_ids.dim() == 3:
            from verl.utils.tensordict_utils import nested_tensor_from_tensor_list

            rows = [position_ids[i][:, attention_mask[i].bool()] for i in range(position_ids.shape[0])]
            out["position_ids"] = nested_tensor_from_tensor_list(rows, ragged_idx=2)
        return out

    setattr(left_right_2_no_padding, _MARK, True)
    return left_right_2_no_padding


_FROM = "vitos_logits_from"
_SFT = False  # install_sft(): also slice the SFT trainer's LM head (from its loss mask)
_LOGGED: list[int] = []


def _wrap_inputs(original):
    @functools.wraps(original)
    def prepare_model_inputs(self, micro_batch):
        from verl.utils import tensordict_utils as tu
        from verl.utils.dataset.dataset_utils import DatasetPadMode

        model_inputs, output_args = original(self, micro_batch)
        flags = {k: tu.get_non_tensor_data(data=micro_batch, key=k, default=d) for k, d in (
            ("use_remove_padding", True), ("use_fused_kernels", False), ("distillation_use_topk", False),
            ("distillation_only", False), ("calculate_sum_pi_squared", False))}  # fmt: skip
        pad_mode = tu.get_non_tensor_data(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING)
        max_response = tu.get_non_tensor_data(data=micro_batch, key="max_response_len", default=-1)
        if pad_mode != DatasetPadMode.NO_PADDING or any(flags.values()):
            return model_inputs, output_args
        if max_response >= 1:  # the actor / reference: right-padded prompts + responses
            lengths = micro_batch["input_ids"].offsets().diff()
            start = max(0, int(lengths.min()) - int(max_response) - 1)
        elif _SFT and "loss_mask" in micro_batch.keys():  # verl's SFT trainer: the loss mask's first token
            start = _first_loss_position(micro_batch["loss_mask"]) - 1
            if not _LOGGED:
                _LOGGED.append(start)
                print(f"vitos_verl: SFT LM head from position {start} (the loss mask's first token less one)", flush=True)
        else:
            return model_inputs, output_args
        if start > 0 and _forward_takes_start(type(self.module)):
            model_inputs[_FROM] = output_args[_FROM] = start
        return model_inputs, output_args

    setattr(prepare_model_inputs, _MARK, True)
    return prepare_model_inputs


def _first_loss_position(loss_mask: torch.Tensor) -> int:
    """The first token position, over the micro-batch, that verl's ``sft_loss`` counts.

    ``loss_mask``: jagged NestedTensor ``(B, j)`` of 0/1 per token (verl 0.9.1
    ``MultiTurnSFTDataset``: 1 on assistant tokens). ``sft_loss`` rolls it left by one, so the
    log-prob at position ``p`` counts when ``loss_mask[p + 1]`` is 1: the LM head is needed from
    the returned position minus one. A sample without any counted token contributes its length.
    """
    values, offsets = loss_mask.values(), loss_mask.offsets()
    first = []
    for i in range(offsets.numel() - 1):
        row = values[offsets[i] : offsets[i + 1]].nonzero()
        first.append(int(row[0, 0]) if row.numel() else int(offsets[i + 1] - offsets[i]))
    return max(1, min(first))


def _wrap_outputs(original):
    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        if _FROM not in output_args:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        import verl.utils.torch_functional as verl_F
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.fsdp.transformer_impl import _scale_logits_by_temperature

        start = output_args[_FROM]
        cu_seqlens = micro_batch["input_ids"].offsets()
        lengths = cu_seqlens.diff()
        logits = output.logits  # (B, max_len - start, V): positions start.. of the right-padded batch
        b, kept, vocab = logits.shape
        max_len = start + kept
        temperature = output_args["temperature"].unsqueeze(-1).unsqueeze(-1)
        logits = _scale_logits_by_temperature(
            logits, temperature, is_unit_temperature=output_args.get("temperature_is_one", False)
        )
        rolled = torch.nested.nested_tensor_from_jagged(output_args["input_ids_rmpad_rolled"], cu_seqlens)
        labels = torch.nested.to_padded_tensor(rolled, padding=0, output_size=(b, max_len))[:, start:]
        log_probs = verl_F.logprobs_from_logits(logits=logits.reshape(-1, vocab), labels=labels.reshape(-1)).view(b, kept)
        valid = torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)

        def packed(kept_values):  # (B, kept) -> jagged (B, j) with zeros before ``start``
            full = torch.cat([kept_values.new_zeros(b, start), kept_values], dim=1)
            return torch.nested.nested_tensor_from_jagged(full[valid], cu_seqlens)

        out = {"log_probs": packed(log_probs)}
        if tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False):
            if self.engine_config.entropy_checkpointing:
                entropy = torch.utils.checkpoint.checkpoint(verl_F.entropy_from_logits, logits)
            else:
                entropy = verl_F.entropy_from_logits(logits)
            out["entropy"] = packed(entropy)
        return out

    setattr(prepare_model_outputs, _MARK, True)
    return prepare_model_outputs


def _wrap_forward(original):
    @functools.wraps(original)
    def forward(self, input_ids=None, labels=None, temperature=1.0, **kwargs):
        start = kwargs.pop(_FROM, None)
        if start is None:
            return original(self, input_ids=input_ids, labels=labels, temperature=temperature, **kwargs)
        from verl.models.transformers.qwen2_vl import Qwen2VLCausalLMOutputWithPast, qwen2_vl_forward

        outputs = qwen2_vl_forward(self, input_ids, **kwargs)
        return Qwen2VLCausalLMOutputWithPast(logits=self.lm_head(outputs[0][:, start:]), hidden_states=outputs.hidden_states)

    setattr(forward, _MARK, True)
    return forward


def _forward_takes_start(model_cls: type) -> bool:
    """Whether ``model_cls``'s forward (as verl's ``apply_monkey_patch`` left it: each model build
    sets it again) is verl's ``forward_with_normal_backend``, wrapped here to slice the LM head's
    input; other forwards (fused kernels, other architectures) are left alone."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from verl.models.transformers.qwen2_vl import forward_with_normal_backend

    cls = Qwen2_5_VLForConditionalGeneration
    if not issubclass(model_cls, cls):
        return False
    if cls.forward is forward_with_normal_backend:
        cls.forward = _wrap_forward(forward_with_normal_backend)
    return getattr(model_cls.forward, _MARK, False)


def install_sft() -> None:
    """In verl's SFT trainer (``verl.trainer.sft_trainer``, no padding, no remove-padding): the LM
    head and log-softmax from the first position the loss mask counts (:func:`_first_loss_position`)
    instead of every prompt position; the loss equals verl's (``tests/test_compat.py``). Used by
    ``vitos_verl.trainer.sft_warmstart``. Idempotent; per process."""
    global _SFT
    _SFT = True
    install_worker()


def install_worker() -> None:
    """In an actor / reference worker: the LM head, log-softmax and entropy at response positions
    only (module doc). Idempotent; per process."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    if getattr(FSDPEngineWithLMHead.prepare_model_inputs, _MARK, False):
        return
    FSDPEngineWithLMHead.prepare_model_inputs = _wrap_inputs(FSDPEngineWithLMHead.prepare_model_inputs)
    FSDPEngineWithLMHead.prepare_model_outputs = _wrap_outputs(FSDPEngineWithLMHead.prepare_model_outputs)


def install() -> None:
    """Make the driver's ``left_right_2_no_padding`` (verl 0.9.1 ``ray_trainer``) keep the token
    axis ragged in 3-D position ids whatever the lengths. Idempotent; per process (the trainer
    calls it at construction, in the Ray task that drives training)."""
    import verl.trainer.ppo.ray_trainer as verl_ray_trainer

    if not getattr(verl_ray_trainer.left_right_2_no_padding, _MARK, False):
        verl_ray_trainer.left_right_2_no_padding = _fixed(verl_ray_trainer.left_right_2_no_padding)


def uninstall_worker() -> None:
    """Undo :func:`install_worker` (verl's full-sequence logits again; for parity checks)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    for name in ("prepare_model_inputs", "prepare_model_outputs"):
        fn = getattr(FSDPEngineWithLMHead, name)
        if getattr(fn, _MARK, False):
            setattr(FSDPEngineWithLMHead, name, fn.__wrapped__)


# --------------------------------------------------------------------------- agent loop
# verl 0.9.1's agent loop (``verl/experimental/agent_loop/agent_loop.py``) has no public hooks for
# what the ViToS loop changes. These mixins (put before verl's class in the bases) take verl's
# private methods and hand them to public-named methods whose defaults are verl's own; the
# ViToS classes (:mod:`vitos_verl.rollout.agent_loop`) override only the public names. Rows V5 to
# V11 of docs/upstream.md; the upstream symbols are pinned by ``tests/test_compat.py``.


class AgentLoopHooks:
    """For a subclass of verl 0.9.1's ``AgentLoopBase`` (row V5)."""

    def _get_mm_processor_kwargs(self, audio_data=None) -> dict:
        # AgentLoopBase._get_mm_processor_kwargs (agent_loop.py:276): the request's processor kwargs
        return self.request_mm_processor_kwargs(super()._get_mm_processor_kwargs(audio_data))

    def request_mm_processor_kwargs(self, kwargs: dict) -> dict:
        """The ``mm_processor_kwargs`` of this loop's requests, given verl's (default: unchanged)."""
        return kwargs


class AgentLoopWorkerHooks:
    """For a subclass of verl 0.9.1's ``AgentLoopWorker`` (rows V6 to V10)."""

    def _compute_multi_modal_inputs(self, output, input_ids):  # agent_loop.py:868 (V6)
        return self.multi_modal_inputs(output, input_ids)

    def multi_modal_inputs(self, output, input_ids) -> dict:
        """A sample's ``multi_modal_inputs`` (verl: the HF processor re-run on the decoded prompt)."""
        return super()._compute_multi_modal_inputs(output, input_ids)

    def _compute_position_ids(self, input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs=None):  # :920 (V7)
        return self.position_ids(input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs)

    def position_ids(self, input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs=None):
        """A sample's ``(1, 4, L)`` position ids (verl: ``get_rope_index`` on the full prompt)."""
        return super()._compute_position_ids(input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs)

    async def _run_agent_loop(self, sampling_params, trajectory, *, agent_name, trace=True, **kwargs):  # :661 (V8)
        return await self.run_sample(sampling_params, trajectory, agent_name=agent_name, trace=trace, **kwargs)

    async def run_sample(self, sampling_params, trajectory, *, agent_name, trace=True, **kwargs):
        """One sample's agent loop, reward and post-processing (verl's ``_run_agent_loop``;
        ``generate_sequences`` gathers these without ``return_exceptions``)."""
        return await super()._run_agent_loop(sampling_params, trajectory, agent_name=agent_name, trace=trace, **kwargs)

    async def _compute_score(self, outputs, kwargs) -> None:  # :967 (V9)
        return await self.score_sample(outputs, kwargs)

    async def score_sample(self, outputs, kwargs) -> None:
        """The reward loop's call for one sample (verl: no time limit; sets ``reward_score`` and
        ``extra_fields["reward_extra_info"]`` of ``outputs[-1]``)."""
        return await super()._compute_score(outputs, kwargs)

    def _postprocess(self, inputs, input_non_tensor_batch=None, validate=False):  # :1057 (V10)
        return self.assemble_batch(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)

    def assemble_batch(self, inputs, input_non_tensor_batch=None, validate=False):
        """The step's ``DataProto`` from the post-processed samples (verl takes the
        ``reward_extra_info`` keys of the first sample for every sample)."""
        return super()._postprocess(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)

    async def postprocess_sample(self, output, validate: bool, **kwargs):
        """verl's ``_agent_loop_postprocess`` (:728) of one ``AgentLoopOutput`` (V8)."""
        return await self._agent_loop_postprocess(output, validate, **kwargs)

    def build_agent_loop(self, agent_name: str, server_manager):
        """The agent loop ``agent_name`` with another ``server_manager``, built as verl 0.9.1's
        ``_run_agent_loop`` builds it (``_agent_loop_registry``, ``DictConfigWrap``,
        ``ToolListWrap``; V8)."""
        import hydra
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry

        return hydra.utils.instantiate(
            config=_agent_loop_registry[agent_name],
            trainer_config=DictConfigWrap(config=self.config),
            server_manager=server_manager,
            tokenizer=self.tokenizer,
            processor=self.processor,
            hf_model_type=self.hf_model_type,
            dataset_cls=self.dataset_cls,
            data_config=DictConfigWrap(self.config.data),
            tools=ToolListWrap(self.tools),
        )


class AgentLoopManagerHooks:
    """For a subclass of verl 0.9.1's ``AgentLoopManager``: its workers are ``worker_class``
    actors (``AgentLoopManager.__init__`` keeps an ``agent_loop_workers_class`` set before it, :1197;
    row V11)."""

    worker_class: type

    def __init__(self, *args, **kwargs):
        import ray

        self.agent_loop_workers_class = ray.remote(self.worker_class)
        super().__init__(*args, **kwargs)


# --------------------------------------------------------------------------- trainer
class TrainerHooks:
    """For a subclass of verl 0.9.1's (legacy, deprecated) ``RayPPOTrainer``
    (``verl/trainer/ppo/ray_trainer.py``; rows V15 to V19 of docs/upstream.md).

    verl's ``fit`` calls ``_validate``, ``_save_checkpoint`` and ``_load_checkpoint``; they reach
    ``validate``, ``save_checkpoint`` and ``load_checkpoint`` (defaults: verl's). The driver-side
    steps a dual-stream step reuses are called by public names: :meth:`balance_batch`,
    :meth:`old_log_prob`, :meth:`ref_log_prob`, :meth:`update_actor`.
    """

    def _validate(self, merged: bool = False):  # ray_trainer.py:596
        return self.validate()

    def validate(self) -> dict:
        """Validation metrics (verl: one generation per prompt, its reward)."""
        return super()._validate()

    def _save_checkpoint(self):  # :983
        return self.save_checkpoint()

    def save_checkpoint(self):
        """verl's save (``<default_local_dir>/global_step_<N>/{actor/, data.pt}``, then the tracker)."""
        return super()._save_checkpoint()

    def _load_checkpoint(self):  # :1052
        return self.load_checkpoint()

    def load_checkpoint(self):
        """verl's resume (``trainer.resume_mode``; sets ``global_steps``)."""
        return super()._load_checkpoint()

    def balance_batch(self, batch, metrics: dict, logging_prefix: str) -> None:
        """verl's ``_balance_batch`` (:1182): reorders ``batch`` in place so each data-parallel rank
        gets a similar token count; logs under ``logging_prefix``."""
        self._balance_batch(batch, metrics=metrics, logging_prefix=logging_prefix)

    def old_log_prob(self, batch):
        """verl's ``_compute_old_log_prob`` (:1290): ``(DataProto with old_log_probs, mfu)``."""
        return self._compute_old_log_prob(batch)

    def ref_log_prob(self, batch):
        """verl's ``_compute_ref_log_prob`` (:1266): a ``DataProto`` with ``ref_log_prob``."""
        return self._compute_ref_log_prob(batch)

    def update_actor(self, batch):
        """verl's ``_update_actor`` (:1327): one actor update on ``batch``; its output's
        ``meta_info["metrics"]``."""
        return self._update_actor(batch)


class _Captured:
    """An in-memory text file: what verl wrote is ``text`` after ``close``."""

    def __init__(self) -> None:
        import io

        self._buf = io.StringIO()
        self.text: str | None = None

    def write(self, s: str) -> int:
        return self._buf.write(s)

    def close(self) -> None:
        self.text = self._buf.getvalue()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def capture_tracker_write(tracker):
    """Within the block, verl 0.9.1's ``RayPPOTrainer._save_checkpoint`` writes its resume tracker
    (``open(<default_local_dir>/latest_checkpointed_iteration.txt, "w")``, ray_trainer.py:1049) to
    memory instead of disk; yields the list of captured files (empty: verl wrote none). Row V19.

    verl's method looks ``open`` up in its module's globals before the builtins, so a module
    global shadows it for that module alone, and only for the tracker path; removed on exit.
    """
    import builtins
    import os

    import verl.trainer.ppo.ray_trainer as module

    captured: list[_Captured] = []
    target = os.path.abspath(tracker)

    def _open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "w" in mode and os.path.abspath(file) == target:
            captured.append(_Captured())
            return captured[-1]
        return builtins.open(file, mode, *args, **kwargs)

    had = "open" in vars(module)
    previous = vars(module).get("open")
    module.open = _open
    try:
        yield captured
    finally:
        if had:
            module.open = previous
        else:
            del module.open


# --------------------------------------------------------------------------- worker
def hold_lr_scheduler(engine):
    """A context manager keeping verl 0.9.1 ``engine``'s LR scheduler where it is for the calls made
    inside the block (row V13).

    verl's ``TrainingWorker.train_batch`` (``verl/workers/engine_workers.py:376``) calls
    ``engine.lr_scheduler_step()`` after the last mini-batch of every ``update_actor`` call; inside
    this block that method (shadowed by an instance attribute, removed on exit) returns the current
    learning rate (first parameter group, as verl's ``FSDPEngine.lr_scheduler_step`` does,
    ``transformer_impl.py:836``) without stepping.
    """

    @contextlib.contextmanager
    def held():
        def current_lr():
            sched = getattr(engine, "lr_scheduler", None)
            return None if sched is None else sched.get_last_lr()[0]

        engine.lr_scheduler_step = current_lr
        try:
            yield
        finally:
            del engine.lr_scheduler_step

    return held()


def set_update_mini_batch(data, size: int) -> None:
    """Set the two keys verl 0.9.1's ``RayPPOTrainer._update_actor`` (ray_trainer.py:1327) puts in
    the actor's TensorDict from ``ppo_mini_batch_size * rollout.n``: ``mini_batch_size`` (how
    ``TrainingWorker.train_mini_batch`` splits the batch) and ``global_batch_size`` (the
    sequence-mean loss modes' normaliser, ``agg_loss``), both to ``size`` samples (row V12)."""
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, mini_batch_size=int(size), global_batch_size=int(size))


# --------------------------------------------------------------------------- dataset
class DatasetHooks:
    """For a subclass of verl 0.9.1's ``RLHFDataset`` (``verl/utils/dataset/rl_dataset.py``; row V21)."""

    def _build_messages(self, example: dict, key: str):  # rl_dataset.py:299
        return self.build_messages(example, key)

    def build_messages(self, example: dict, key: str) -> list:
        """The chat of ``example[key]`` with its ``<image>`` placeholders turned into image parts (verl's)."""
        return super()._build_messages(example, key)


# --------------------------------------------------------------------------- driver internals
def rollout_server_handles(trainer) -> list[list]:
    """Ray handles of the rollout replicas' ``vLLMHttpServer`` actors, one list per replica (row V22).

    verl 0.9.1: ``trainer.llm_server_manager.get_replicas()`` (``verl/workers/rollout/llm_server.py:538``),
    else ``trainer.checkpoint_manager.replicas`` (``verl/checkpoint_engine/base.py:420``); each
    replica's ``servers``, else its private ``_server_handle`` (``llm_server.py:485``).

    Raises:
        RuntimeError: the trainer has no rollout replicas.
    """
    manager = getattr(trainer, "llm_server_manager", None)
    replicas = manager.get_replicas() if manager is not None else getattr(getattr(trainer, "checkpoint_manager", None), "replicas", None)
    if not replicas:
        raise RuntimeError("no rollout replicas (trainer.llm_server_manager / checkpoint_manager.replicas)")
    servers = []
    for replica in replicas:
        handles = list(getattr(replica, "servers", None) or [])
        if not handles and getattr(replica, "_server_handle", None) is not None:
            handles = [replica._server_handle]
        servers.append(handles)
    return servers


def tracking_backends(tracker) -> dict:
    """verl 0.9.1 ``Tracking``'s backends (``verl/utils/tracking.py:38``: its ``logger`` dict, the
    configured backend name -> its module or adapter; one not installed is absent). Row V23."""
    return dict(getattr(tracker, "logger", None) or {})


def tensorboard_writer(backend):
    """The ``SummaryWriter`` of verl 0.9.1's tensorboard adapter (``tracking.py:560``, ``.writer``)."""
    return backend.writer


def file_logger_path(backend) -> str:
    """The metrics file of verl 0.9.1's ``FileLogger`` (``tracking.py:534``, ``.filepath``)."""
    return backend.filepath
