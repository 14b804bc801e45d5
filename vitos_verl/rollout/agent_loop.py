"""verl agent-loop extension: rollouts on pruned visual tokens that the actor can replay.

verl's agent-loop worker post-processes every rollout by re-running the HF processor on the
decoded prompt and by calling ``get_rope_index``: both assume every ``<|image_pad|>`` is present.
For a pruned sample that would rebuild the *full* prompt, so the actor would compute
log-probs on other inputs than the ones vLLM sampled from. This module closes that gap:

* :class:`PrunedAgentLoop` (agent name ``vitos_pruned``): a single-turn loop whose request
  carries ``mm_processor_kwargs={"vitos_keep": "<rows>x<cols>:<hex>"}``
  (:class:`vitos_verl.pruning.KeepMask`; the vLLM plugin
  prunes the prompt to the kept cells) and whose returned ``prompt_ids`` keep only the kept
  image tokens. Without ``vitos_keep`` (the grounding stream) it is verl's single-turn loop.
  Every request of one question (its ``n_g`` grounding and ``n_g * n_r`` reasoning samples) goes
  to the server under one routing key, ``vitos-<uid>`` (:func:`routing_key`), so verl's sticky
  load balancer sends the reasoning requests to the replica that served the question's grounding
  requests, whose ViT cache holds the image's features (see "Routing" below).
* :class:`ViToSAgentLoopWorker`: puts ``vitos_keep_mask`` (flat bool, all True when unpruned)
  into every image sample's ``multi_modal_inputs`` next to the full image's ``pixel_values``
  and ``image_grid_thw``, and computes the ``(1, 4, L)`` position ids (text row + 3-D M-RoPE)
  with :func:`vitos_verl.pruning.mrope_position_ids`, the same function the vLLM plugin uses.
  Every sample of both streams has the key, so micro-batches mixing streams (``order: joint``)
  concatenate cleanly.
  The worker also fences each sample: an exception in one sample's agent loop (the rollout, or
  the reward loop's call) is logged with the sample's index and replaced by a placeholder
  flagged as failed (the columns of :mod:`vitos_verl.records`; the trainer counts them,
  :mod:`vitos_verl.trainer.faults`), so the step goes on without it.
* :class:`ViToSAgentLoopManager`: verl's manager with that worker; selected with
  ``actor_rollout_ref.rollout.agent.agent_loop_manager_class``.

Routing (verl 0.9.1)
--------------------
``LLMServerClient.generate(request_id, ...)`` (``verl/workers/rollout/llm_server.py``) asks the
load balancer for a server by ``request_id``; verl's default ``GlobalRequestLoadBalancer``
(``verl/workers/rollout/router.py``) keeps an LRU map ``request_id -> server`` (10,000 entries)
and routes a new id to the least-loaded server. verl's ``SingleTurnAgentLoop.run`` makes a fresh
``uuid4`` id per sample, so a question's reasoning requests landed anywhere. :class:`PrunedAgentLoop`
wraps its ``server_manager`` for the call (:class:`_RoutedServer`) so ``generate`` gets
``request_id = vitos-<uid>`` (``uid``: the question's id, a per-sample column the trainer puts
in both streams' batches and that verl passes to ``run``; training and validation both set it).
The first request of a question picks the least-loaded server, the rest stick to it (the
balancer is a Ray actor: acquires are serialised). Sharing one id among in-flight requests is
safe there, which this relies on (private behaviour of verl 0.9.1):

* vLLM never sees the key: ``LLMServerClient._vllm_request_id`` sends a fresh ``uuid4`` per
  call (and vLLM 0.24 ``InputProcessor.assign_request_id`` adds a random suffix anyway);
* ``release_server`` decrements the in-flight count of the *server id* it is given (the
  ``request_id`` is only forwarded to balancers that declare it in ``require_release_fields``),
  so the counts stay exact with repeated ids;
* nothing else in the client, ``vLLMHttpServer.generate`` or the rollout trace keys state on it.

Without a ``uid`` (a caller outside the trainer), with ``rollout.full_determinism`` (verl then
routes by ``hash(request_id)`` and passes it to vLLM: its own ``det-<priority>`` ids are kept) or
with a router plugin (``rollout.router_config_path``: its bookkeeping may be per request id),
verl's id is used unchanged. Load is balanced per question, not per sample: fine while a batch
has many more questions than replicas.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopManager,
    AgentLoopMetrics,
    AgentLoopOutput,
    AgentLoopWorker,
    register,
)
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.utils.tokenizer.tokenizer import get_processor_token_id
from verl.workers.rollout.replica import TokenOutput

from vitos_verl.compat import verl_0_9
from vitos_verl.pruning import KEEP_ALL, KEEP_FIELD, KEEP_KWARG, KeepMask, cell_grid_of, mrope_position_ids
from vitos_verl.records import AGENT_NAME, ERROR_KEY, FAILED_KEY, FAULT_KEY
from vitos_verl.rewards.guard import GUARDED_KEYS, failed_scores, normalize_scores
from vitos_verl.rollout.pruned_inputs import prune_input_ids

logger = logging.getLogger(__name__)

#: Seconds on top of ``vitos.reward_timeout_s`` for one reward-loop call (queueing, Ray round trip).
REWARD_CALL_MARGIN_S = 30.0
#: Prefix of the routing key of a question's requests (:func:`routing_key`).
ROUTE_PREFIX = "vitos-"


def routing_key(uid: Any, rollout_config: Any = None) -> str | None:
    """The load balancer's key for every request of the question ``uid``: ``vitos-<uid>``.

    ``None`` (keep verl's per-request id) without a uid, with ``full_determinism`` or with a
    router plugin (``router_config_path``) in ``rollout_config`` (module doc, "Routing").
    """
    if uid is None or (isinstance(uid, float) and uid != uid) or str(uid) == "":
        return None
    if rollout_config is not None and (
        getattr(rollout_config, "full_determinism", False) or getattr(rollout_config, "router_config_path", None)
    ):
        return None
    return f"{ROUTE_PREFIX}{uid}"


class _RoutedServer:
    """A ``server_manager`` whose ``generate`` goes out under a fixed routing key (module doc)."""

    def __init__(self, inner: Any, key: str):
        self._inner, self._key = inner, key

    async def generate(self, request_id: Any = None, **kwargs: Any) -> Any:
        return await self._inner.generate(request_id=self._key, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@register(AGENT_NAME)
class PrunedAgentLoop(verl_0_9.AgentLoopHooks, SingleTurnAgentLoop):
    """Single-turn rollout on the visual tokens a keep mask selects (see module doc).

    Per-sample input (``non_tensor_batch`` columns): ``vitos_keep``
    (:data:`~vitos_verl.pruning.KEEP_KWARG`), the keep mask of the prompt's one image as a request
    carries it (:meth:`vitos_verl.pruning.KeepMask.request_value`: ``"RxC:hex"``, or ``""`` for the
    full image); ``uid``, the question's id: its requests all go out under
    :func:`routing_key` (one replica per question; module doc, "Routing").

    Raises:
        ValueError: a keep mask on a prompt that has not exactly one image, or whose image
            token count does not match the mask's grid.
    """

    async def run(self, sampling_params: dict[str, Any], vitos_keep: str = "", **kwargs) -> Any:
        self._vitos_keep = str(vitos_keep or "")
        key = routing_key(kwargs.get("uid"), getattr(self, "rollout_config", None))
        server = self.server_manager
        if key is not None:
            self.server_manager = _RoutedServer(server, key)
        try:
            output = await super().run(sampling_params, **kwargs)
        finally:
            self.server_manager = server
        if self._vitos_keep:
            mask = KeepMask.decode(self._vitos_keep)
            images = (output.multi_modal_data or {}).get("images") or []
            if len(images) != 1:
                raise ValueError(f"visual-token pruning needs exactly one image per prompt, got {len(images)}")
            rows, cols = mask.cell_grid
            grid = torch.tensor([[1, 2 * rows, 2 * cols]])  # the (t, h, w) patches of the mask's cell grid
            ids = torch.tensor(output.prompt_ids, dtype=torch.long)
            output.prompt_ids = prune_input_ids(ids, grid, [mask], get_processor_token_id(self.processor, "image")).tolist()
        return output

    def request_mm_processor_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """verl's request kwargs plus :data:`~vitos_verl.pruning.KEEP_KWARG` when this sample is pruned."""
        if getattr(self, "_vitos_keep", ""):
            kwargs[KEEP_KWARG] = self._vitos_keep
        return kwargs


class RewardLoopError(RuntimeError):
    """The reward loop's call for a sample raised (its cause is the original exception)."""


class _OneTokenServer:
    """Stands in for the LLM server while a failed sample's placeholder is built: answers one token."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    async def generate(self, *, sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
        logprobs = [0.0] if sampling_params.get("logprobs") else None
        return TokenOutput(token_ids=[self.token_id], log_probs=logprobs, stop_reason="aborted")


class ViToSAgentLoopWorker(verl_0_9.AgentLoopWorkerHooks, AgentLoopWorker):
    """verl's agent-loop worker whose post-processing knows pruned prompts and whose failed
    samples become flagged placeholders instead of ending the step (module doc)."""

    def multi_modal_inputs(self, output, input_ids) -> dict[str, torch.Tensor]:
        """verl's, with the processor run on the full image and the flat keep mask added."""
        mm_kwargs = dict(output.mm_processor_kwargs or {})
        keep = mm_kwargs.pop(KEEP_KWARG, KEEP_ALL)
        if keep:  # the processor re-expands the collapsed image run to the full image
            output = output.model_copy(update={"mm_processor_kwargs": mm_kwargs})
        inputs = super().multi_modal_inputs(output, input_ids)
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return inputs
        if keep and grid.shape[0] != 1:
            raise ValueError(f"a keep mask prunes one image; image_grid_thw has {grid.shape[0]} rows")
        masks = [KeepMask.decode(keep, cell_grid_of(g)) for g in grid] if keep else [KeepMask.keep_all(cell_grid_of(g)) for g in grid]
        inputs[KEEP_FIELD] = KeepMask.concat(masks)
        return inputs

    def position_ids(self, input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs=None):
        """Pruned M-RoPE ids (:func:`vitos_verl.pruning.mrope_position_ids`) for an image sample, verl's otherwise."""
        flat = multi_modal_inputs.get(KEEP_FIELD)
        if flat is None:
            return super().position_ids(input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs)
        multi_modal_inputs.pop("mm_token_type_ids", None)
        grid = multi_modal_inputs["image_grid_thw"]
        masks = KeepMask.split(flat, grid)
        vision = mrope_position_ids(input_ids[0], grid, get_processor_token_id(self.processor, "image"), masks, attention_mask[0])
        valid = attention_mask[0].bool()
        text = torch.ones((1, input_ids.shape[1]), dtype=torch.long)
        text[0, valid] = torch.arange(int(valid.sum()))
        return torch.cat([text.unsqueeze(0), vision.unsqueeze(0)], dim=1)  # (1, 4, L), verl's layout

    # ---------------------------------------------------------------- failed samples
    # verl 0.9.1's generate_sequences awaits one sample's loop per sample under a plain
    # asyncio.gather, so one sample's exception ended the whole step.
    async def run_sample(self, sampling_params, trajectory, *, agent_name, trace=True, **kwargs):
        """verl's per-sample agent loop; an ``Exception`` becomes a failed placeholder.

        Every output gets the non-tensor columns :data:`FAILED_KEY` (0/1), :data:`FAULT_KEY`
        (``""``, ``"rollout"`` or ``"reward"``) and :data:`ERROR_KEY` (``"<type>: <message>"``).
        The placeholder (:meth:`_placeholder`) has the sample's prompt, a one-token response whose
        ``response_mask`` is 0, and a reward of 0. Cancellation (``BaseException``) is not caught.
        """
        try:
            out = await super().run_sample(sampling_params, trajectory, agent_name=agent_name, trace=trace, **kwargs)
        except Exception as exc:
            fault = "reward" if isinstance(exc, RewardLoopError) else "rollout"
            cause = exc.__cause__ if fault == "reward" and exc.__cause__ is not None else exc
            error = f"{type(cause).__name__}: {cause}"[:500]
            logger.error(
                "sample %s (step %s, rollout %s, agent %s) failed in its %s: %s; it gets a placeholder and zero advantage",
                trajectory.get("sample_index"), trajectory.get("step"), trajectory.get("rollout_n"), agent_name, fault, error,
                exc_info=exc,
            )
            out = await self._placeholder(sampling_params, trajectory, agent_name, kwargs)
            out.response_mask.zero_()
            out.extra_fields.update({FAILED_KEY: 1, FAULT_KEY: fault, ERROR_KEY: error})
            return out
        out.extra_fields.update({FAILED_KEY: 0, FAULT_KEY: "", ERROR_KEY: ""})
        return out

    async def _placeholder(self, sampling_params, trajectory, agent_name, kwargs):
        """A well-formed output for a failed sample, post-processed as verl does the others.

        First the sample's own agent loop against a server that answers one end-of-sequence token
        (the real prompt, images and keep mask: the batch stays uniform); if that raises too (the
        fault is in the prompt itself), a text-only sample of one token. Either has reward 0.

        Raises:
            Exception: only if even the text-only placeholder cannot be post-processed (the step
                then ends, as it did before this fence).
        """
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else (self.tokenizer.pad_token_id or 0)
        try:
            output = await self.build_agent_loop(agent_name, _OneTokenServer(eos)).run(sampling_params, **kwargs)
            return await self._postprocess_placeholder(output, trajectory, kwargs)
        except Exception as exc:
            logger.error("sample %s: placeholder with its prompt failed too (%s: %s); using a text-only one",
                         trajectory.get("sample_index"), type(exc).__name__, exc)
        logprobs = [0.0] if sampling_params.get("logprobs") else None
        output = AgentLoopOutput(prompt_ids=[eos], response_ids=[eos], response_mask=[0], response_logprobs=logprobs,
                                 num_turns=2, metrics=AgentLoopMetrics(), extra_fields={})
        return await self._postprocess_placeholder(output, trajectory, kwargs)

    async def _postprocess_placeholder(self, output: AgentLoopOutput, trajectory, kwargs):
        if self.reward_loop_worker_handles is not None:  # verl adds rm_scores only when every sample has one
            output.reward_score = 0.0
            output.extra_fields["reward_extra_info"] = {}  # keys filled in by _postprocess
        return await self.postprocess_sample(output, trajectory["validate"], **kwargs)

    # the reward loop's call for one sample (inside run_sample)
    async def score_sample(self, outputs, kwargs) -> None:
        """verl's reward-loop call under a time limit, its result normalised for both streams.

        The reward loop calls the configured ``reward.custom_reward_function`` (the built-in
        entry has its own per-call limit, :mod:`vitos_verl.rewards.guard`). Any configured
        function gets here: the call's ``reward_extra_info`` normalised to
        :data:`~vitos_verl.rewards.guard.GUARDED_KEYS`
        (:func:`~vitos_verl.rewards.guard.normalize_scores`), and a limit of
        ``vitos.reward_timeout_s`` plus :data:`REWARD_CALL_MARGIN_S` (queueing in the reward
        loop and the Ray round trip) on the whole call: past it the sample scores 0 with
        ``reward_timeout = 1`` (a function that never returns keeps its executor thread in the
        reward-loop worker).

        Raises:
            RewardLoopError: the call raised (the fault's kind; the cause is the original).
        """
        final = outputs[-1]
        if final.reward_score is not None or self.reward_loop_worker_handles is None:
            return await super().score_sample(outputs, kwargs)
        limit = float(self.config.vitos.reward_timeout_s) + REWARD_CALL_MARGIN_S
        try:
            await asyncio.wait_for(super().score_sample(outputs, kwargs), timeout=limit)
            # verl logs a number's score as "acc" only; the score itself is reward_score
            info = normalize_scores({"score": final.reward_score, **(final.extra_fields.get("reward_extra_info") or {})})
        except asyncio.TimeoutError:
            logger.warning("reward loop call of sample %s ran past %g s: scored 0", kwargs.get("index"), limit)
            final.reward_score, info = 0.0, failed_scores(timeout=True)
        except Exception as exc:
            raise RewardLoopError(f"reward loop call failed: {type(exc).__name__}") from exc
        final.extra_fields["reward_extra_info"] = info

    # verl takes the reward_extra_info keys of the first sample for every sample
    def assemble_batch(self, inputs, input_non_tensor_batch=None, validate=False):
        """verl's batch assembly, after giving failed samples the others' reward keys (zeros)."""
        ok = [o for o in inputs if not o.extra_fields.get(FAILED_KEY)]
        keys = list(ok[0].extra_fields.get("reward_extra_info", {})) if ok else list(GUARDED_KEYS)
        for o in inputs:
            if o.extra_fields.get(FAILED_KEY) and o.reward_score is not None:
                o.extra_fields["reward_extra_info"] = dict.fromkeys(keys, 0.0)
        return super().assemble_batch(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)


class ViToSAgentLoopManager(verl_0_9.AgentLoopManagerHooks, AgentLoopManager):
    """verl's ``AgentLoopManager`` running :class:`ViToSAgentLoopWorker` actors."""

    worker_class = ViToSAgentLoopWorker
