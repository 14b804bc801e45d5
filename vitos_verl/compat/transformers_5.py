"""Hooks into transformers 5.10.4 (``transformers==5.10.4`` in pyproject.toml; row T1 of
docs/upstream.md).

The actor's pruned forward wraps the Qwen2.5-VL inner model's ``forward`` (a class attribute
assignment, after verl 0.9.1's ``apply_monkey_patch`` has replaced the same method); this module
is where that assignment happens. ``tests/test_compat.py`` pins the method's signature and source.
"""

from __future__ import annotations

from collections.abc import Callable

TRANSFORMERS_VERSION = "5.10.4"
_MARK = "_vitos_wrapped"


def wrap_qwen2_5_vl_model_forward(wrap: Callable) -> bool:
    """Replace ``Qwen2_5_VLModel.forward`` (``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py``,
    or what verl put there) by ``wrap(current forward)``, once (idempotent). Returns whether it
    replaced it now."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    if getattr(Qwen2_5_VLModel.forward, _MARK, False):
        return False
    forward = wrap(Qwen2_5_VLModel.forward)
    setattr(forward, _MARK, True)
    Qwen2_5_VLModel.forward = forward
    return True


def model_output(**fields):
    """transformers' ``Qwen2_5_VLModelOutputWithPast`` (the stock outer forward reads its
    ``rope_deltas``)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModelOutputWithPast

    return Qwen2_5_VLModelOutputWithPast(**fields)
