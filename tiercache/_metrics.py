"""Counters of what the cache did, and a rate-limited logger so a dead Redis cannot flood logs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

__all__ = ["CacheStats", "Counters", "RateLimitedLog"]

logger = logging.getLogger("tiercache")


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters, as returned by ``TieredCache.stats()``.

    Counters are plain integers updated without a lock, so under heavy contention between
    threads a few increments may be lost: they are for monitoring, not accounting.
    """

    l1_hits: int
    l2_hits: int
    misses: int
    loads: int
    load_errors: int
    backend_errors: int
    codec_errors: int
    not_cached: int
    l1_size: int
    l1_bytes: int
    in_flight: int
    bus_connected: bool | None = None
    """Whether the invalidation subscriber is subscribed (None: no bus, L1-only or coherent=False)."""
    bus_messages: int = 0
    bus_flushes: int = 0
    bus_gaps: int = 0

    @property
    def hit_ratio(self) -> float:
        """Hits (L1 and L2) over all lookups that reached the cache."""
        total = self.l1_hits + self.l2_hits + self.misses
        return (self.l1_hits + self.l2_hits) / total if total else 0.0


class Counters:
    __slots__ = ("backend_errors", "codec_errors", "l1_hits", "l2_hits", "load_errors", "loads", "misses", "not_cached")

    def __init__(self) -> None:
        self.l1_hits = 0
        self.l2_hits = 0
        self.misses = 0
        self.loads = 0
        self.load_errors = 0
        self.backend_errors = 0
        self.codec_errors = 0
        self.not_cached = 0


class RateLimitedLog:
    """Logs a warning per kind at most once per ``interval`` seconds, counting the ones skipped."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def emit(self, kind: str, msg: str, *args: object, exc: BaseException | None = None) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} similar messages suppressed)" if skipped else ""
        logger.warning(msg + suffix, *args, exc_info=exc)
