"""The vLLM plugin's one LRU (vitos_verl.rollout.lru): both bounds, recency, deferred trimming,
byte accounting on replacement, and the bounds changed at run time, on real tensors."""

from __future__ import annotations

import torch

from vitos_verl.rollout.lru import BoundedLRU, tensor_bytes


def _feat(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 8, dtype=torch.bfloat16)  # 16 bytes a row


def test_count_bound_evicts_the_least_recently_used():
    lru = BoundedLRU(max_items=2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru["a"] == 1  # a is now more recent than b
    lru.put("c", 3)
    assert "b" not in lru and "a" in lru and "c" in lru and len(lru) == 2


def test_byte_bound_counts_tensor_bytes_and_replacements():
    lru = BoundedLRU(max_bytes=100, sizeof=tensor_bytes)
    lru.put("a", _feat(2))  # 32 bytes
    lru.put("b", _feat(3))  # 48
    assert lru.nbytes == 80
    lru.put("a", _feat(1))  # replacing a value subtracts the old one's bytes
    assert lru.nbytes == 64 == sum(tensor_bytes(v) for v in lru.values())
    lru.put("c", _feat(4))  # 64 + 64 > 100: the least recent (b, after a's replacement) goes
    assert "b" not in lru and lru.nbytes == 80
    lru.put("huge", _feat(7))  # 112 bytes alone: over the bound, evicted with everything older
    assert len(lru) == 0 and lru.nbytes == 0


def test_both_bounds_at_once():
    lru = BoundedLRU(max_items=3, max_bytes=60, sizeof=tensor_bytes)
    for k in "abc":
        lru.put(k, _feat(1))  # 16 bytes each: the count bound bites first
    lru.put("d", _feat(1))
    assert list(lru._data) == ["b", "c", "d"]
    lru.put("e", _feat(2))  # 4 entries, 80 bytes: the count bound takes b, the byte bound c
    assert list(lru._data) == ["d", "e"] and lru.nbytes == 48


def test_deferred_trim_serves_a_whole_batch_then_evicts():
    lru = BoundedLRU(max_items=2)
    for k in "xyz":  # one forward pass with three distinct images
        lru.put(k, k.upper(), trim=False)
    out = [lru[k] for k in "xyz"]
    assert out == ["X", "Y", "Z"] and len(lru) == 3
    assert lru.trim() == 1 and "x" not in lru


def test_bounds_changed_at_run_time_apply_at_the_next_trim():
    lru = BoundedLRU(max_items=10)
    for k in range(5):
        lru.put(k, k)
    lru.max_items = 2
    assert len(lru) == 5
    assert lru.trim() == 3 and sorted(lru._data) == [3, 4]
    lru.max_items = None
    for k in range(5, 9):
        lru.put(k, k)
    assert len(lru) == 6


def test_get_and_clear():
    lru = BoundedLRU(max_items=2, sizeof=len)
    lru.put("a", "xyz")
    assert lru.get("a") == "xyz" and lru.get("missing") is None and lru.get("missing", "d") == "d"
    lru.clear()
    assert len(lru) == 0 and lru.nbytes == 0 and "a" not in lru
