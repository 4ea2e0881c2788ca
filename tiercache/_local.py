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
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._types import MISSING

__all__ = ["FRESH_UNTIL", "SIZE", "STALE_UNTIL", "VALID_UNTIL", "VALUE", "Entry", "LocalCache"]

#: An L1 entry: ``(value, fresh_until, size, valid_until, stale_until)``, read by position
#: through these names everywhere (a plain tuple: a NamedTuple's field access and
#: construction cost more on the hit path, measured with benchmarks/bench_core.py).
Entry = tuple[Any, float, int, float, float]
VALUE: Final = 0
FRESH_UNTIL: Final = 1
SIZE: Final = 2
VALID_UNTIL: Final = 3
STALE_UNTIL: Final = 4


class LocalCache:
    """An LRU bounded by entries and, optionally, by bytes (each value's serialized size
    before compression: what the process holds, see ``Codec.held_size``)."""

    __slots__ = ("_clock", "_data", "_lock", "accepting", "bytes", "maxbytes", "maxsize", "outage", "outage_ttl")

    def __init__(self, maxsize: int, maxbytes: int | None, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self.bytes = 0
        # False while the invalidation bus is not known to be healthy (L1 is emptied at the
        # same moment): puts are dropped, so nothing is served. Except during an outage (the
        # last Redis command failed, so no other process can publish an invalidation either):
        # puts are then kept for at most ``outage_ttl`` seconds (the staleness bound a
        # half-open link already has), so the outage does not send every call to the
        # function; ``outage_ttl`` 0 drops them too.
        self.accepting = True
        self.outage = False
        self.outage_ttl = 0.0
        self._clock = clock
        # key -> (value, fresh_until, size, valid_until, stale_until). The hit path reads only
        # the first two: a hit is an entry before ``fresh_until``. Past it, the slow path
        # (``Core.read_through``) looks further: before ``valid_until`` (later than
        # ``fresh_until`` only with refresh-ahead) it is still served while a refresh runs;
        # before ``stale_until`` (later only with ``stale_ttl``) it is kept to be served if
        # the function fails. Without those policies all three deadlines are equal.
        self._data: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def reset_lock(self) -> None:
        """After a fork (another thread may have held the lock at that moment)."""
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        """The fresh value under ``key`` (and mark it recently used), else MISSING."""
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        if entry[FRESH_UNTIL] > self._clock():
            try:
                self._data.move_to_end(key)
            except KeyError:  # removed by another thread since the get: still a hit
                pass
            return entry[VALUE]
        if entry[STALE_UNTIL] <= self._clock():
            self._remove_if(key, entry)
        return MISSING

    def fresh_values(self, keys: Sequence[str]) -> list[Any] | None:
        """The fresh values of all ``keys`` (each marked recently used: in use, the LRU must
        not evict it before the entries that depend on it), or None if any is not fresh."""
        data, now, out = self._data, self._clock(), []
        for key in keys:
            entry = data.get(key)
            if entry is None or entry[FRESH_UNTIL] <= now:
                return None
            try:
                data.move_to_end(key)
            except KeyError:  # removed by another thread since the get: still fresh
                pass
            out.append(entry[VALUE])
        return out

    def hit_parts(self) -> tuple[Callable[[str], Entry | None], Callable[[str], None], Callable[[], float]]:
        """What an inlined hit path binds once: the entries' ``get``, ``move_to_end``, the clock."""
        return self._data.get, self._data.move_to_end, self._clock

    def entry(self, key: str) -> Entry | None:
        """The raw entry under ``key``, fresh or not (see the layout in ``__init__``)."""
        return self._data.get(key)

    def put(self, key: str, value: Any, ttl: float, size: int) -> None:
        """Store ``value`` for ``ttl`` seconds; evict least recently used entries past the bounds."""
        self.put_until(key, value, self._clock() + ttl, size)

    def put_until(
        self,
        key: str,
        value: Any,
        expires_at: float,
        size: int,
        fresh_until: float | None = None,
        stale_until: float | None = None,
    ) -> None:
        """Store ``value`` until the clock reads ``expires_at``; evict past the bounds.

        ``fresh_until`` (earlier): from then on a call refreshes it ahead of expiry;
        ``stale_until`` (later): kept that long to be served if the function fails."""
        if not self.accepting:
            # Redis is down, and the bus with it: live at most outage_ttl.
            expires_at = min(expires_at, self._clock() + self.outage_ttl)
        fresh = expires_at if fresh_until is None else min(fresh_until, expires_at)
        stale = expires_at if stale_until is None else max(stale_until, expires_at)
        if (
            (not self.accepting and (not self.outage or self.outage_ttl <= 0))
            or self.maxsize <= 0
            or (self.maxbytes is not None and size > self.maxbytes)
            or stale <= self._clock()
        ):
            self.pop(key)
            return
        entry = (value, fresh, size, expires_at, stale)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[SIZE]
            self._data[key] = entry
            self.bytes += size
            data = self._data
            while len(data) > self.maxsize or (self.maxbytes is not None and self.bytes > self.maxbytes):
                _, evicted = data.popitem(last=False)
                self.bytes -= evicted[SIZE]

    def pop(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[SIZE]

    def clear(self, keep_stale: bool = False) -> None:
        """Drop every entry; ``keep_stale``: entries within their ``stale_ttl`` stay, but only
        to be served if the function fails (they are no longer fresh or valid)."""
        now = self._clock()
        with self._lock:
            kept = (
                [(k, e) for k, e in self._data.items() if e[STALE_UNTIL] > max(now, e[VALID_UNTIL])]
                if keep_stale
                else []
            )
            self._data.clear()
            self.bytes = 0
            for key, (value, _, size, _, stale) in kept:
                self._data[key] = (value, 0.0, size, 0.0, stale)
                self.bytes += size

    def ttl_left(self, key: str) -> float | None:
        """Seconds until ``key`` expires in L1, or None when it is not there (for tests and stats)."""
        entry = self._data.get(key)
        return None if entry is None else entry[FRESH_UNTIL] - self._clock()

    def _remove_if(self, key: str, entry: Entry) -> None:
        with self._lock:
            if self._data.get(key) is entry:
                del self._data[key]
                self.bytes -= entry[SIZE]
