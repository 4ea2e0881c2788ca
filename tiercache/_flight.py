"""The in-flight table: per-process single-flight of loads, and the dirty marks of invariant 2.

One record per key being loaded. Later callers of the same key wait for the leader instead
of loading again. An invalidation of a key marks its in-flight record dirty: the leader still
answers its own callers with what it loaded, but must not put that result into L1, because it
may have been computed from data older than the invalidation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Flight", "FlightTable"]


class Flight:
    """One in-flight load. Waiters register a callback run (in any thread) when it ends."""

    __slots__ = ("_callbacks", "_lock", "abandoned", "dirty", "done", "error", "key", "value")

    def __init__(self, key: str) -> None:
        self.key = key
        self.dirty = False
        self.done = False
        self.abandoned = False  # the leader stopped without an outcome (cancelled, interrupted)
        self.value: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add_waiter(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the flight ends; False (and no call) if it has ended already."""
        with self._lock:
            if self.done:
                return False
            self._callbacks.append(callback)
            return True

    def finish(self, value: Any) -> None:
        self.value = value
        self._end()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._end()

    def abandon(self) -> None:
        self.abandoned = True
        self._end()

    def _end(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class FlightTable:
    """Key -> the Flight loading it. Thread-safe; shared by sync and async callers."""

    __slots__ = ("_flights", "_lock")

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._flights)

    def lead_or_join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (must load) or joins it."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight(key)
            return flight, True

    def release(self, flight: Flight) -> None:
        with self._lock:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    def mark_dirty(self, keys: Iterable[str]) -> None:
        """Mark the loads of ``keys`` dirty and detach them: later callers start a fresh load
        instead of joining one that may have read data older than the invalidation."""
        with self._lock:
            for key in keys:
                flight = self._flights.pop(key, None)
                if flight is not None:
                    flight.dirty = True

    def mark_all_dirty(self) -> None:
        with self._lock:
            for flight in self._flights.values():
                flight.dirty = True
            self._flights.clear()
