"""L1: a bounded LRU of decoded values with a per-entry TTL on an injected monotonic clock.

Why not cachetools: its TTLCache has one TTL for all entries and TLRUCache pays for a heap
on every insert; an L1 entry's TTL here is the smaller of ``l1_ttl`` and the remaining Redis
TTL (invariant: an L1 copy never outlives its L2 copy), so it differs per entry. An
OrderedDict gives O(1) LRU order in C; ``get`` is lock-free (each OrderedDict operation is
atomic under the GIL) and only inserts and removals, which keep the byte count, take a lock.
``benchmarks/bench_core.py`` measures the hit against cachetools.cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ._types import MISSING

__all__ = ["LocalCache"]


class LocalCache:
    """An LRU bounded by entries and, optionally, by the bytes of the values' encodings."""

    __slots__ = ("_clock", "_data", "_lock", "accepting", "bytes", "maxbytes", "maxsize")

    def __init__(self, maxsize: int, maxbytes: int | None, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self.bytes = 0
        # False while L1 must not be trusted (the invalidation bus is not known to be healthy):
        # puts are dropped, so with the cache emptied at the same time nothing is served.
        self.accepting = True
        self._clock = clock
        # key -> (value, expires_at, size)
        self._data: OrderedDict[str, tuple[Any, float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def reset_lock(self) -> None:
        """After a fork (another thread may have held the lock at that moment)."""
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        """The live value under ``key`` (and mark it recently used), else MISSING."""
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        if entry[1] > self._clock():
            try:
                self._data.move_to_end(key)
            except KeyError:  # removed by another thread since the get: still a hit
                pass
            return entry[0]
        self._remove_if(key, entry)
        return MISSING

    def put(self, key: str, value: Any, ttl: float, size: int) -> None:
        """Store ``value`` for ``ttl`` seconds; evict least recently used entries past the bounds."""
        self.put_until(key, value, self._clock() + ttl, size)

    def put_until(self, key: str, value: Any, expires_at: float, size: int) -> None:
        """Store ``value`` until the clock reads ``expires_at``; evict past the bounds."""
        if (
            not self.accepting
            or self.maxsize <= 0
            or (self.maxbytes is not None and size > self.maxbytes)
            or expires_at <= self._clock()
        ):
            self.pop(key)
            return
        entry = (value, expires_at, size)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._data[key] = entry
            self.bytes += size
            data = self._data
            while len(data) > self.maxsize or (self.maxbytes is not None and self.bytes > self.maxbytes):
                _, evicted = data.popitem(last=False)
                self.bytes -= evicted[2]

    def pop(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[2]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def ttl_left(self, key: str) -> float | None:
        """Seconds until ``key`` expires in L1, or None when it is not there (for tests and stats)."""
        entry = self._data.get(key)
        return None if entry is None else entry[1] - self._clock()

    def _remove_if(self, key: str, entry: tuple[Any, float, int]) -> None:
        with self._lock:
            if self._data.get(key) is entry:
                del self._data[key]
                self.bytes -= entry[2]
