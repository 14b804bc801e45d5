"""Hooks into verl 0.9.1 (``recipes/REQUIRED_VERSIONS.txt``).

``left_right_2_no_padding`` (``verl/workers/utils/padding.py``, imported by name into
``verl/trainer/ppo/ray_trainer.py``, where the driver converts every batch it sends to the actor
and reference workers) builds Qwen2.5-VL's M-RoPE ``position_ids`` (``(B, 4, L)``) as a jagged
NestedTensor with ``torch.nested.as_nested_tensor``, which infers the ragged dimension from the
shapes: when every sample of the batch has the same valid length (a batch of one, or a converged
policy whose samples are the same length), it picks the 4 M-RoPE components instead of the
tokens. verl's workers then set ``_ragged_idx = 2`` on it (``maybe_fix_3d_position_ids``) and the
next ``unbind`` fails ("split_with_sizes expects split_sizes to sum exactly to ..."): a training
step with equal-length samples crashes. Upstream: verl issue #7899 and PR #7349 (the fix, after
0.9.1). :func:`install` wraps the driver's function so that 3-D position ids are rebuilt with
verl's own ``nested_tensor_from_tensor_list(..., ragged_idx=2)``, as that PR does.
"""

from __future__ import annotations

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


def install() -> None:
    """Make the driver's ``left_right_2_no_padding`` (verl 0.9.1 ``ray_trainer``) keep the token
    axis ragged in 3-D position ids whatever the lengths. Idempotent; per process (the trainer
    calls it at construction, in the Ray task that drives training)."""
    import verl.trainer.ppo.ray_trainer as verl_ray_trainer

    if not getattr(verl_ray_trainer.left_right_2_no_padding, _MARK, False):
        verl_ray_trainer.left_right_2_no_padding = _fixed(verl_ray_trainer.left_right_2_no_padding)
