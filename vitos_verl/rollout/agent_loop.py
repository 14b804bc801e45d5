"""verl agent-loop extension: rollouts on pruned visual tokens that the actor can replay.

verl's agent-loop worker post-processes every rollout by re-running the HF processor on the
decoded prompt and by calling ``get_rope_index``: both assume every ``<|image_pad|>`` is present.
For a pruned sample that would rebuild the *full* prompt, so the actor would compute
log-probs on other inputs than the ones vLLM sampled from. This module closes that gap:

* :class:`PrunedAgentLoop` (agent name ``vitos_pruned``): a single-turn loop whose request
  carries ``mm_processor_kwargs={"vitos_keep": "<rows>x<cols>:<hex>"}`` (the vLLM plugin
  prunes the prompt to the kept cells) and whose returned ``prompt_ids`` keep only the kept
  image tokens. Without ``vitos_keep`` (the grounding stream) it is verl's single-turn loop.
* :class:`ViToSAgentLoopWorker`: puts ``vitos_keep_mask`` (flat bool, all True when unpruned)
  into every image sample's ``multi_modal_inputs`` next to the full image's ``pixel_values``
  and ``image_grid_thw``, and computes the ``(1, 4, L)`` position ids (text row + 3-D M-RoPE)
  with :func:`vitos_verl.pruning.mrope_position_ids`, the same function the vLLM plugin uses.
  Every sample of both streams has the key, so micro-batches mixing streams (``order: joint``)
  concatenate cleanly.
* :class:`ViToSAgentLoopManager`: verl's manager with that worker; selected with
  ``actor_rollout_ref.rollout.agent.agent_loop_manager_class``.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.utils.tokenizer.tokenizer import get_processor_token_id

from vitos_verl.pruning import MERGE_SIZE, decode_keep_mask, mrope_position_ids
from vitos_verl.rollout.actor_patch import KEEP_KEY
from vitos_verl.rollout.pruned_inputs import prune_input_ids

AGENT_NAME = "vitos_pruned"
KEEP_KWARG = "vitos_keep"


@register(AGENT_NAME)
class PrunedAgentLoop(SingleTurnAgentLoop):
    """Single-turn rollout on the visual tokens a keep mask selects (see module doc).

    Per-sample input (a ``non_tensor_batch`` column): ``vitos_keep``, the encoded keep mask of
    the prompt's one image (:func:`vitos_verl.pruning.encode_keep_mask`), or ``""`` for the
    full image.

    Raises:
        ValueError: a keep mask on a prompt that has not exactly one image, or whose image
            token count does not match the mask's grid.
    """

    async def run(self, sampling_params: dict[str, Any], vitos_keep: str = "", **kwargs) -> Any:
        self._vitos_keep = str(vitos_keep or "")
        output = await super().run(sampling_params, **kwargs)
        if self._vitos_keep:
            mask = decode_keep_mask(self._vitos_keep)
            images = (output.multi_modal_data or {}).get("images") or []
            if len(images) != 1:
                raise ValueError(f"visual-token pruning needs exactly one image per prompt, got {len(images)}")
            grid = torch.tensor([[1, mask.shape[0] * MERGE_SIZE, mask.shape[1] * MERGE_SIZE]])
            ids = torch.tensor(output.prompt_ids, dtype=torch.long)
            output.prompt_ids = prune_input_ids(ids, grid, [mask], get_processor_token_id(self.processor, "image")).tolist()
        return output

    def _get_mm_processor_kwargs(self, audio_data=None) -> dict[str, Any]:
        kwargs = super()._get_mm_processor_kwargs(audio_data)
        if getattr(self, "_vitos_keep", ""):
            kwargs[KEEP_KWARG] = self._vitos_keep
        return kwargs


class ViToSAgentLoopWorker(AgentLoopWorker):
    """verl's agent-loop worker whose post-processing knows pruned prompts (module doc)."""

    def _compute_multi_modal_inputs(self, output, input_ids) -> dict[str, torch.Tensor]:
        mm_kwargs = dict(output.mm_processor_kwargs or {})
        keep = mm_kwargs.pop(KEEP_KWARG, "")
        if keep:  # the processor re-expands the collapsed image run to the full image
            output = output.model_copy(update={"mm_processor_kwargs": mm_kwargs})
        inputs = super()._compute_multi_modal_inputs(output, input_ids)
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return inputs
        if keep:
            mask = decode_keep_mask(keep)
            rows, cols = int(grid[0, 1]) // MERGE_SIZE, int(grid[0, 2]) // MERGE_SIZE
            if grid.shape[0] != 1 or tuple(mask.shape) != (rows, cols):
                raise ValueError(f"keep mask {tuple(mask.shape)} does not match image_grid_thw {grid.tolist()}")
            inputs[KEEP_KEY] = mask.flatten()
        else:
            inputs[KEEP_KEY] = torch.ones(int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // MERGE_SIZE**2, dtype=torch.bool)
        return inputs

    def _compute_position_ids(self, input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs=None):
        flat = multi_modal_inputs.get(KEEP_KEY)
        if flat is None:
            return super()._compute_position_ids(input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs)
        multi_modal_inputs.pop("mm_token_type_ids", None)
        from vitos_verl.rollout.pruned_inputs import split_keep_mask

        grid = multi_modal_inputs["image_grid_thw"]
        masks = split_keep_mask(flat, grid)
        vision = mrope_position_ids(input_ids[0], grid, get_processor_token_id(self.processor, "image"), masks, attention_mask[0])
        valid = attention_mask[0].bool()
        text = torch.ones((1, input_ids.shape[1]), dtype=torch.long)
        text[0, valid] = torch.arange(int(valid.sum()))
        return torch.cat([text.unsqueeze(0), vision.unsqueeze(0)], dim=1)  # (1, 4, L), verl's layout


class ViToSAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager`` running :class:`ViToSAgentLoopWorker` actors."""

    def __init__(self, *args, **kwargs):
        self.agent_loop_workers_class = ray.remote(ViToSAgentLoopWorker)
        super().__init__(*args, **kwargs)
