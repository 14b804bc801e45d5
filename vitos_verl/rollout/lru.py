"""One bounded least-recently-used map for the vLLM plugin's three caches.

Used by :mod:`vitos_verl.rollout.vllm_processor` (the carrier map: image hash -> grid and carrier
hash, bounded by count) and :mod:`vitos_verl.rollout.vllm_model` (the ViT cache: image key ->
full-image features, bounded by count *and* bytes; the kept pixels: image key -> preprocessed
patches, bounded by bytes).

Why not ``cachetools.LRUCache`` (8.0): its one ``maxsize`` is fixed at construction and it evicts
on insert (raising ``ValueError`` for a value larger than ``maxsize``). The ViT cache needs two
bounds at once, bounds an engine's owner may change at run time, and eviction *after* a batch:
every image of a forward pass is served before the least recently used ones go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def tensor_bytes(t) -> int:
    """Bytes of a ``torch.Tensor``'s elements (``numel * element_size``), the size the plugin's
    tensor caches count."""
    return t.numel() * t.element_size()


class BoundedLRU(Generic[K, V]):
    """A map that forgets its least recently used entries beyond ``max_items`` entries or beyond
    ``max_bytes`` summed ``sizeof(value)``.

    ``max_items`` / ``max_bytes``: ``None`` for no bound; plain attributes, read by :meth:`trim`.
    ``sizeof``: the size of a value (default 0, i.e. only the count bounds). Reading an entry
    (``cache[key]``, :meth:`get`) or putting it makes it the most recently used; ``in`` and
    :meth:`values` do not. :meth:`put` trims unless told not to (``trim=False``, then call
    :meth:`trim` once the batch is served). Not thread-safe: a caller shared between threads
    holds its own lock.
    """

    def __init__(
        self, max_items: int | None = None, max_bytes: int | None = None, sizeof: Callable[[V], int] | None = None
    ):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._sizeof = sizeof or (lambda _v: 0)
        self._data: OrderedDict[K, V] = OrderedDict()
        self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Summed ``sizeof`` of the values held."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getitem__(self, key: K) -> V:
        """The value of ``key``, now the most recently used; ``KeyError`` if absent."""
        self._data.move_to_end(key)
        return self._data[key]

    def get(self, key: K, default: V | None = None) -> V | None:
        """``self[key]`` or ``default``."""
        return self[key] if key in self._data else default

    def values(self) -> Iterator[V]:
        """The values, least recently used first (recency unchanged)."""
        return iter(self._data.values())

    def items(self) -> Iterator[tuple[K, V]]:
        """``(key, value)`` pairs, least recently used first (recency unchanged)."""
        return iter(self._data.items())

    def put(self, key: K, value: V, *, trim: bool = True) -> None:
        """Set ``key`` to ``value`` as the most recently used entry (replacing any old value), then
        :meth:`trim` unless ``trim=False``; a value over ``max_bytes`` on its own is evicted by that
        trim like any other."""
        old = self._data.pop(key, None)
        if old is not None:
            self._nbytes -= self._sizeof(old)
        self._data[key] = value
        self._nbytes += self._sizeof(value)
        if trim:
            self.trim()

    def trim(self) -> int:
        """Evict least recently used entries until both bounds hold; returns how many went."""
        n = 0
        while self._data and (
            (self.max_items is not None and len(self._data) > self.max_items)
            or (self.max_bytes is not None and self._nbytes > self.max_bytes)
        ):
            _, old = self._data.popitem(last=False)
            self._nbytes -= self._sizeof(old)
            n += 1
        return n

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()
        self._nbytes = 0
