"""The upstream hooks of ``vitos_verl.compat``: each pinned by the signature and a hash of the
upstream function's source (an upgrade fails here, naming the hook), and each shown to fix what
it is for on real-shaped data."""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch

from vitos_verl.compat import verl_0_9

# (module, function) -> (signature, sha256 of inspect.getsource) in verl 0.9.1
PINNED = {
    ("verl.workers.utils.padding", "left_right_2_no_padding"): (
        "(data: tensordict._td.TensorDict) -> tensordict._td.TensorDict",
        "8b09e2ef9bb544fa95661223f7d002e6cd8ec76b250b0ca6335916d5082acf87",
    ),
}


@pytest.mark.parametrize("where", sorted(PINNED))
def test_upstream_functions_are_the_pinned_ones(where):
    import importlib

    import verl

    fn = getattr(importlib.import_module(where[0]), where[1])
    fn = inspect.unwrap(fn)
    signature, digest = PINNED[where]
    assert verl.__version__ == verl_0_9.VERL_VERSION
    assert str(inspect.signature(fn)) == signature, f"{where}: signature changed; review vitos_verl.compat.verl_0_9"
    got = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    assert got == digest, f"{where}: source changed since verl {verl_0_9.VERL_VERSION}; review vitos_verl.compat.verl_0_9"


def _batch(lengths: list[int], width: int = 12):
    """verl's left-right padded layout of M-RoPE samples: (B, width) ids and masks, (B, 4, width) positions."""
    from tensordict import TensorDict

    b = len(lengths)
    attention = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, width - n - 2 : width - 2] = 1  # left-padded prompt, then a 2-token response slot
    positions = torch.arange(width).repeat(b, 4, 1) * 10 + torch.arange(4).view(1, 4, 1)
    return TensorDict(
        {"input_ids": torch.arange(b * width).view(b, width), "attention_mask": attention,
         "response_mask": attention[:, -4:], "position_ids": positions},
        batch_size=b,
    )  # fmt: skip


@pytest.mark.parametrize("lengths", [[5, 5, 5], [7], [4, 6]])
def test_driver_keeps_mrope_tokens_ragged_for_equal_lengths(lengths):
    """verl 0.9.1 turns equal-length 3-D position ids into a layout its workers cannot index (the
    "split_with_sizes" crash of a step whose samples all have one length); after install() the
    driver's conversion gives (4, L_i) per sample whatever the lengths, as verl's workers index it."""
    import verl.trainer.ppo.ray_trainer as verl_ray_trainer
    from verl.utils.tensordict_utils import index_select_tensor_dict, maybe_fix_3d_position_ids

    def select_all(convert):
        td = convert(_batch(lengths))
        maybe_fix_3d_position_ids(td)  # what verl's workers do first
        return index_select_tensor_dict(td, list(range(len(lengths))))["position_ids"].unbind()

    original = inspect.unwrap(verl_ray_trainer.left_right_2_no_padding)
    if len(set(lengths)) == 1:
        with pytest.raises(RuntimeError):  # "split_with_sizes expects ..." in a training step
            select_all(original)
    verl_0_9.install()
    verl_0_9.install()  # idempotent
    assert inspect.unwrap(verl_ray_trainer.left_right_2_no_padding) is original
    rows = select_all(verl_ray_trainer.left_right_2_no_padding)
    padded = _batch(lengths)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        assert row.shape == (4, n)
        assert torch.equal(row, padded["position_ids"][i][:, padded["attention_mask"][i].bool()])
