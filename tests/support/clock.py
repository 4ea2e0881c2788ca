"""The tests' clock, injected as ``TieredCache(clock=...)`` or ``LocalCache(..., clock)``."""

from __future__ import annotations

import time


class Clock:
    """Real monotonic time plus an offset the test moves forward (:meth:`advance`): timeouts
    elapse as they would, and TTLs are jumped over without sleeping.

    ``Clock(frozen=True)`` stands still between advances (for expiry at an exact instant).
    ``start`` is where it begins: the offset (ticking) or the time (frozen)."""

    def __init__(self, start: float = 10_000.0, *, frozen: bool = False) -> None:
        self.offset = start
        self.frozen = frozen

    def __call__(self) -> float:
        return self.offset if self.frozen else time.monotonic() + self.offset

    @property
    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> None:
        self.offset += seconds
