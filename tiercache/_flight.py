"""The in-flight table: single-flight of loads, and the one lock that orders L1 fills and evictions.

One record (a :class:`Flight`) per key being loaded. Later callers of the same key wait for
the leader instead of loading again. Writes register detached records ("watches") for the
keys they write. An invalidation of a key marks its records dirty and evicts the key from L1
in one step under the table's lock; a fill puts into L1 only if its record is still clean,
under the same lock. So whichever comes second wins the right way (invariant 2): a load or
write overtaken by an invalidation answers its own callers but never enters L1, and no fill
can slip in between an invalidation's check and its eviction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._local import LocalCache
from ._types import MISSING

__all__ = ["ELSEWHERE", "Flight", "FlightTable"]

#: ``Flight.thread`` of a signal that the holder of a key's lease ends (by its fill or
#: release) when that holder is a load of this process, on any thread (its flight may have
#: been detached here); a lease of another process leaves ``thread`` None (see ``_lease``).
ELSEWHERE = -1


# One lock for every Flight's waiters: waiting is rare (only concurrent misses of one key),
# and a lock per flight would be allocated on every miss and every L2 hit.
_SIGNALS = threading.Lock()


class Flight:
    """One in-flight load (or, detached from the table, one write's watch on a key). It ends
    once; waiters register a callback run (in any thread) when it does."""

    __slots__ = (
        "_callbacks",
        "abandoned",
        "cancel",
        "dirty",
        "done",
        "error",
        "key",
        "marker",
        "served_stale",
        "stale",
        "thread",
        "timed_out",
        "value",
    )

    def __init__(self, key: str) -> None:
        self.done = False
        self._callbacks: list[Callable[[], None]] | None = None
        self.key = key
        self.dirty = False
        self.abandoned = False  # the leader stopped without an outcome (cancelled, interrupted)
        self.value: Any = None
        self.error: BaseException | None = None
        #: A value past its TTL but within ``stale_ttl``, to answer with if the load fails
        #: or outlasts the soft timeout.
        self.stale: Any = MISSING
        #: Stops the load when it runs detached as an asyncio task (set by the driver).
        self.cancel: Callable[[], Any] | None = None
        #: Our lease marker in Redis while the load holds the key's lease (else empty).
        self.marker = b""
        #: The load failed and its waiters were answered with ``stale``.
        self.served_stale = False
        #: Its callers gave up at ``hard_timeout``: a late result is stored nowhere.
        self.timed_out = False
        #: The thread that must run for this to end: the leader's (an async leader's: its
        #: event loop's), None while a worker thread is about to take the load over, or
        #: ELSEWHERE for a signal another process (another lease's holder) ends. A blocking
        #: wait on that very thread would never end (see ``_sync.wait``).
        self.thread: int | None = None

    def add_waiter(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when this ends; False (and no call) if it has ended already."""
        with _SIGNALS:
            if self.done:
                return False
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(callback)
            return True

    def _end(self) -> None:
        with _SIGNALS:
            if self.done:
                return
            self.done = True
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()

    def finish(self, value: Any) -> None:
        self.value = value
        self._end()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._end()

    def abandon(self) -> None:
        self.abandoned = True
        self._end()


class FlightTable:
    """Key -> the Flight loading it, plus writes' watches. Thread-safe; shared by sync and async."""

    __slots__ = ("_fills", "_flights", "_local", "_lock", "_watches")

    def __init__(self, local: LocalCache) -> None:
        self._local = local
        self._flights: dict[str, Flight] = {}
        self._watches: dict[str, list[Flight]] = {}
        # key -> the signal our load waits on while another *process* holds the key's lease:
        # ended by that fill's announcement, or by anything that evicts the key here.
        self._fills: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._flights)

    def reset(self) -> None:
        """After a fork: the loads and writes in flight belonged to threads that are gone."""
        global _SIGNALS  # noqa: PLW0603 - another thread may have held it at the fork
        _SIGNALS = threading.Lock()
        self._lock = threading.Lock()
        self._flights = {}
        self._watches = {}
        self._fills = {}

    def lead_or_join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (must load) or joins it."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight(key)
            flight.thread = threading.get_ident()
            return flight, True

    def release(self, flight: Flight) -> None:
        with self._lock:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    def watch(self, keys: Sequence[str]) -> list[Flight]:
        """Detached records for a write of ``keys``: invalidations arriving meanwhile dirty them."""
        watches = [Flight(key) for key in keys]
        with self._lock:
            for w in watches:
                self._watches.setdefault(w.key, []).append(w)
        return watches

    def fill(
        self,
        flight: Flight,
        value: Any,
        expires_at: float,
        size: int,
        fresh_until: float | None = None,
        stale_until: float | None = None,
    ) -> None:
        """Put a load's result into L1 (until ``expires_at``) unless an invalidation overtook it."""
        local = self._local
        if local.maxsize <= 0 or not (local.accepting or (local.outage and local.outage_ttl > 0)):
            return
        with self._lock:
            if not flight.dirty:
                self._local.put_until(flight.key, value, expires_at, size, fresh_until, stale_until)

    def commit_write(
        self,
        watches: Sequence[Flight],
        values: Sequence[Any] | None,
        expires_at: float,
        sizes: Sequence[int],
        fresh_until: float | None = None,
        stale_until: float | None = None,
    ) -> None:
        """After a write reached Redis: evict its keys here (dirtying loads in flight), then
        keep the written values in L1 for the keys no other write has overtaken meanwhile."""
        with self._lock:
            for w in watches:
                self._unwatch(w)
            woken = self._evict([w.key for w in watches])
            if values is not None:
                for w, value, size in zip(watches, values, sizes, strict=True):
                    if not w.dirty:
                        self._local.put_until(w.key, value, expires_at, size, fresh_until, stale_until)
        _wake(woken)

    def abort_write(self, watches: Sequence[Flight]) -> None:
        with self._lock:
            for w in watches:
                self._unwatch(w)
            woken = self._evict([w.key for w in watches])
        _wake(woken)

    def fill_each(self, watches: Sequence[Flight], entries: dict[str, tuple[Any, float, int]]) -> None:
        """Reads of several keys (``watch`` ed): put ``entries`` (key -> value, expiry, size)
        into L1 for the keys no invalidation overtook, and drop every watch."""
        with self._lock:
            for w in watches:
                self._unwatch(w)
                entry = entries.get(w.key)
                if entry is not None and not w.dirty:
                    self._local.put_until(w.key, *entry)  # (value, expires, size)

    def unwatch(self, watches: Sequence[Flight]) -> None:
        """A write that did not happen and leaves L1 as it is (a refresh another process runs)."""
        with self._lock:
            for w in watches:
                self._unwatch(w)

    def await_fill(self, key: str) -> Flight:
        """A signal that ends when another process's fill (or release) of ``key`` is announced,
        or when anything evicts ``key`` here: then it is worth looking in Redis again."""
        with self._lock:
            signal = self._fills.get(key)
            if signal is None or signal.done:
                signal = self._fills[key] = Flight(key)
            return signal

    def drop_fill(self, signal: Flight) -> None:
        """A wait for another process's fill is over: forget its signal (if still ours)."""
        with self._lock:
            if self._fills.get(signal.key) is signal:
                del self._fills[signal.key]

    def announced(self, keys: Iterable[str]) -> None:
        """Fills (or releases) of ``keys`` by other processes: wake whoever waits for them."""
        with self._lock:
            woken = [signal for key in keys if (signal := self._fills.pop(key, None)) is not None]
        _wake(woken)

    def evict(self, keys: Iterable[str]) -> None:
        """An invalidation of ``keys``: dirty and detach their loads and watches, drop them from L1."""
        with self._lock:
            woken = self._evict(keys)
        _wake(woken)

    def flush(self, accepting: bool, keep_stale: bool = True) -> None:
        """Everything may be stale (lost messages): dirty every load and watch, empty L1, and
        let L1 take new entries only if ``accepting`` (the bus is known to be healthy).

        Entries within a ``stale_ttl`` stay, demoted: never served as fresh again, only if
        their function fails (the fail-safe outlives the outage it is for); unless not
        ``keep_stale`` (a flush that is an invalidation: ``cache.clear()``)."""
        with self._lock:
            for flight in self._flights.values():
                flight.dirty = True
            self._flights.clear()
            for watches in self._watches.values():
                for w in watches:
                    w.dirty = True
            woken = list(self._fills.values())
            self._fills.clear()
            self._local.accepting = accepting
            self._local.clear(keep_stale=keep_stale)
        _wake(woken)

    def _evict(self, keys: Iterable[str]) -> list[Flight]:
        woken = []
        for key in keys:
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.dirty = True
            for w in self._watches.get(key, ()):
                w.dirty = True
            self._local.pop(key)
            signal = self._fills.pop(key, None)
            if signal is not None:
                woken.append(signal)
        return woken

    def _unwatch(self, watch: Flight) -> None:
        watches = self._watches.get(watch.key)
        if watches is not None:
            watches.remove(watch)
            if not watches:
                del self._watches[watch.key]


def _wake(signals: list[Flight]) -> None:
    # Outside the table's lock: waking runs waiters' callbacks.
    for signal in signals:
        signal.finish(None)
