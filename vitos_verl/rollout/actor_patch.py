"""Pruned visual tokens in the actor's and reference's transformers forward (verl FSDP workers).

A pruned sample's ``multi_modal_inputs`` carry, next to the processor's ``pixel_values`` and
``image_grid_thw`` of the *full* images, ``vitos_keep_mask``: the images' keep masks
flattened and concatenated (bool, ``sum_i rows_i * cols_i``); verl concatenates it across a
micro-batch like the other multi-modal tensors. Its ``input_ids`` hold only the kept
``<|image_pad|>`` tokens and its ``position_ids`` are the pruned M-RoPE ids of
:func:`vitos_verl.pruning.mrope_position_ids` (the same cells and positions as the vLLM plugin,
so rollout and training see one sequence).

:func:`apply_actor_patch` wraps ``Qwen2_5_VLModel.forward`` (verl's own patch of it included,
so call it after verl's ``apply_monkey_patch``): without ``vitos_keep_mask`` the wrapped
forward runs untouched; with it, the vision encoder runs once on each distinct full image of
the micro-batch (the samples of one question share its output, and their gradients flow into
that one pass), each sample's kept rows are scattered into the token embeddings and the
language model runs on them (:func:`~vitos_verl.rollout.pruned_inputs.pruned_inputs_embeds`).
"""

from __future__ import annotations

import functools

from vitos_verl.compat import transformers_5
from vitos_verl.pruning import KEEP_FIELD
from vitos_verl.rollout.pruned_inputs import pruned_inputs_embeds


def _wrap(orig):
    @functools.wraps(orig)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, image_grid_thw=None, **kwargs):
        keep = kwargs.pop(KEEP_FIELD, None)
        if keep is None:
            return orig(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                **kwargs,
            )
        if position_ids is None:
            raise ValueError("pruned inputs need explicit position_ids (vitos_verl.pruning.mrope_position_ids)")
        if kwargs.get("pixel_values_videos") is not None:
            raise NotImplementedError("visual-token pruning of videos is not supported")
        if pixel_values is None or image_grid_thw is None:
            raise ValueError(f"{KEEP_FIELD} given without pixel_values / image_grid_thw")
        for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "inputs_embeds", "labels", "mm_token_type_ids"):
            kwargs.pop(k, None)
        # the flat mask as verl concatenated it; the ViT runs once per distinct image of the micro-batch
        embeds = pruned_inputs_embeds(self, input_ids, pixel_values, image_grid_thw, keep)
        out = self.language_model(
            input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        if isinstance(out, tuple):
            return out
        # the stock outer forward reads `rope_deltas` (verl's reads `[0]`): the stock output type
        return transformers_5.model_output(
            last_hidden_state=out.last_hidden_state,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            rope_deltas=None,
        )

    return forward


def apply_actor_patch() -> None:
    """Wrap ``Qwen2_5_VLModel.forward`` to accept ``vitos_keep_mask`` (idempotent).

    Call it in every actor/reference worker after verl's ``apply_monkey_patch`` (which
    replaces the same method): the ViToS worker does so after building its model.
    """
    transformers_5.wrap_qwen2_5_vl_model_forward(_wrap)
