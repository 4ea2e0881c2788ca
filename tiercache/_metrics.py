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
    lease_waits: int = 0
    """Times a miss waited for another process's load of the key (cross-process single-flight)."""
    lease_timeouts: int = 0
    """Waits for another process's load that ran out, after which this process loaded itself."""
    stale_served: int = 0
    """Calls answered with a value past its TTL (within ``stale_ttl``) because the load failed
    or outlasted ``soft_timeout``."""
    load_timeouts: int = 0
    """Calls that gave up on a load at ``hard_timeout``."""
    refreshes_ahead: int = 0
    """Background refreshes started before expiry (``refresh_beta`` / ``refresh_after``)."""
    errors_cached: int = 0
    """Exceptions kept in L1 by ``cache_errors`` (negative caching)."""
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
    __slots__ = (
        "backend_errors",
        "codec_errors",
        "errors_cached",
        "l1_hits",
        "l2_hits",
        "lease_timeouts",
        "lease_waits",
        "load_errors",
        "load_timeouts",
        "loads",
        "misses",
        "not_cached",
        "refreshes_ahead",
        "stale_served",
    )

    def __init__(self) -> None:
        self.l1_hits = 0
        self.l2_hits = 0
        self.misses = 0
        self.loads = 0
        self.load_errors = 0
        self.backend_errors = 0
        self.codec_errors = 0
        self.not_cached = 0
        self.lease_waits = 0
        self.lease_timeouts = 0
        self.stale_served = 0
        self.load_timeouts = 0
        self.refreshes_ahead = 0
        self.errors_cached = 0


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
