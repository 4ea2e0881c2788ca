"""Counters of what the cache did, and a rate-limited logger so a dead Redis cannot flood logs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

__all__ = ["BUS_COUNTER_FIELDS", "COUNTER_FIELDS", "STATS_FIELDS", "CacheStats", "Counters", "RateLimitedLog"]

logger = logging.getLogger("tiercache")


def _counter(help_text: str, source: str = "counters") -> dict[str, str]:
    """A CacheStats field that only grows: its metric's help text, and where ``Core.stats()``
    reads it (``counters``: the ``Counters`` attribute of that name; ``bus``: the Bus attribute without ``bus_``)."""
    return {"kind": "counter", "help": help_text, "source": source, "metric": ""}


def _gauge(help_text: str, metric: str = "") -> dict[str, str]:
    """A CacheStats field that goes up and down (``metric``: its exported name, if not the field's)."""
    return {"kind": "gauge", "help": help_text, "source": "", "metric": metric}


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters, as returned by ``TieredCache.stats()``.

    Counters are plain integers updated without a lock, so under heavy contention between
    threads a few increments may be lost: they are for monitoring, not accounting.

    The one definition of the counters: each field's metadata gives its kind (``counter`` or
    ``gauge``) and help text, from which ``Counters``, ``Core.stats()`` and the exporters of
    ``tiercache.metrics`` are made.
    """

    l1_hits: int = dataclasses.field(metadata=_counter("Calls answered from this process's L1."))
    l2_hits: int = dataclasses.field(metadata=_counter("Calls answered from Redis."))
    misses: int = dataclasses.field(metadata=_counter("Lookups neither tier could answer."))
    loads: int = dataclasses.field(metadata=_counter("Calls of the cached functions."))
    load_errors: int = dataclasses.field(metadata=_counter("Calls of the cached functions that raised."))
    backend_errors: int = dataclasses.field(metadata=_counter("Redis commands that failed (the call failed open)."))
    codec_errors: int = dataclasses.field(
        metadata=_counter("Values in Redis that could not be decoded (treated as misses).")
    )
    not_cached: int = dataclasses.field(
        metadata=_counter("Results returned but not cached (unencodable or too large).")
    )
    l1_size: int = dataclasses.field(metadata=_gauge("Entries in L1.", metric="l1_entries"))
    l1_bytes: int = dataclasses.field(metadata=_gauge("Bytes of the encoded values in L1."))
    in_flight: int = dataclasses.field(metadata=_gauge("Loads in progress."))
    lease_waits: int = dataclasses.field(
        default=0, metadata=_counter("Waits for another process's load of the same key.")
    )
    """Times a miss waited for another process's load of the key (cross-process single-flight)."""
    lease_timeouts: int = dataclasses.field(
        default=0, metadata=_counter("Waits for another process's load that ran out.")
    )
    """Waits for another process's load that ran out, after which this process loaded itself."""
    stale_served: int = dataclasses.field(
        default=0, metadata=_counter("Calls answered with a stale value (stale_ttl).")
    )
    """Calls answered with a value past its TTL (within ``stale_ttl``) because the load failed
    or outlasted ``soft_timeout``."""
    load_timeouts: int = dataclasses.field(default=0, metadata=_counter("Loads given up at hard_timeout."))
    """Calls that gave up on a load at ``hard_timeout``."""
    refreshes_ahead: int = dataclasses.field(
        default=0, metadata=_counter("Background refreshes started before expiry.")
    )
    """Background refreshes started before expiry (``refresh_beta`` / ``refresh_after``)."""
    errors_cached: int = dataclasses.field(default=0, metadata=_counter("Exceptions kept in L1 (cache_errors)."))
    """Exceptions kept in L1 by ``cache_errors`` (negative caching)."""
    bus_connected: bool | None = dataclasses.field(
        default=None,
        metadata=_gauge("1 while the invalidation subscriber is subscribed (L1 trusted), else 0."),
    )
    """Whether the invalidation subscriber is subscribed (None: no bus, L1-only or coherent=False)."""
    bus_messages: int = dataclasses.field(default=0, metadata=_counter("Invalidation messages received.", "bus"))
    bus_flushes: int = dataclasses.field(
        default=0, metadata=_counter("Times L1 was emptied because messages may have been lost.", "bus")
    )
    bus_gaps: int = dataclasses.field(default=0, metadata=_counter("Gaps found in the invalidation sequence.", "bus"))

    @property
    def hit_ratio(self) -> float:
        """Hits (L1 and L2) over all lookups that reached the cache."""
        total = self.l1_hits + self.l2_hits + self.misses
        return (self.l1_hits + self.l2_hits) / total if total else 0.0


#: CacheStats' fields with their metadata, in order.
STATS_FIELDS: tuple[dataclasses.Field[object], ...] = dataclasses.fields(CacheStats)
#: The counters this process keeps itself (``Counters``' attributes), in CacheStats' order.
COUNTER_FIELDS: tuple[str, ...] = tuple(
    f.name for f in STATS_FIELDS if f.metadata["kind"] == "counter" and f.metadata["source"] == "counters"
)
#: The fields the bus counts: ``Core.stats()`` reads them from the Bus (0 without one).
BUS_COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in STATS_FIELDS if f.metadata.get("source") == "bus")


class Counters:
    """The counters of one cache, one plain slot per name in ``COUNTER_FIELDS`` (made from
    CacheStats' definition): ``counters.l1_hits += 1`` is an ordinary attribute update, no lock."""

    __slots__ = COUNTER_FIELDS

    def __init__(self) -> None:
        for name in COUNTER_FIELDS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        """Every counter's current value, by name."""
        return {name: getattr(self, name) for name in COUNTER_FIELDS}

    if TYPE_CHECKING:  # the slots are made from COUNTER_FIELDS, so name them for mypy: all ints

        def __getattr__(self, name: str) -> int: ...

        def __setattr__(self, name: str, value: int) -> None: ...


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
