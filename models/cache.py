"""One small LRU cache for every layer (model bundles, adapters, prompt embeddings, the engine's per-image caches).

Not thread-safe by itself: callers that share one across threads hold their own lock around it (the
loader and the adapters do; the Editor serialises GPU work through one lock).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any


class LRU:
    """At most ``size`` entries; using one (``get``, ``get_or`` hit, ``put``) makes it the most recent,
    and adding beyond ``size`` drops the least recent."""

    def __init__(self, size: int):
        if int(size) < 1:
            raise ValueError(f"LRU size must be at least 1, got {size!r}")
        self.size = int(size)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, True)`` when ``key`` is cached, else ``(make(), False)`` after storing it.
        ``make`` runs outside any bookkeeping, so when it raises nothing is stored."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = make()
        self.put(key, value)
        return value, False

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The cached value (now the most recent), or ``default``."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` as the most recent entry, dropping the least recent ones beyond ``size``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        return self._items.pop(key, default)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:  # a membership test is not a use: order unchanged
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:  # least recent first
        return iter(list(self._items))

    def values(self) -> list[Any]:
        return list(self._items.values())

    def __repr__(self) -> str:
        return f"LRU(size={self.size}, entries={len(self._items)})"
