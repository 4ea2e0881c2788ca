"""The cross-process wait: another process holds a key's lease, so wait for its fill
instead of loading too (see docs/stampede.md, across processes)."""

from __future__ import annotations

from typing import Any

from . import _remote
from ._core import Core
from ._flight import ELSEWHERE, Flight
from ._steps import Flow, Wait
from ._types import FAILED, SKIPPED

__all__ = ["await_other"]


def await_other(core: Core, key: str, marker: bytes) -> Flow[tuple[Any, float]]:
    """Wait for the fill of the lease holder of ``key`` (another process), then read it.

    Each round reads the key again in one script (``wait_lease``) that also raises the
    key's waiter flag, so the holder's fill or release is announced on the bus and ends
    our wait (``FlightTable.await_fill``; registered before the read, so an announcement
    cannot slip in between). A wait is bounded by what the other lease has left: a holder
    that died (SIGKILL) costs at most the lease TTL, after which we (or another waiter,
    whose new lease we then wait for, up to twice the lease TTL in all) take the lease.
    With no bus to hear announcements (``coherent=False``, or it is reconnecting) the
    rounds back off from 5 ms to 250 ms instead. Returns what ``fetch`` would have (a
    value, True for our lease, False: load without storing) and when its read was sent."""
    lease = core.lease_ms / 1000.0
    started = core.clock()
    deadline = started + lease
    lease_ends = 0.0
    pause = 0.005
    signal: Flight | None = None
    try:
        while True:
            signal = core.flights.await_fill(key)
            op = _remote.wait_lease(key, marker, core.lease_ms)
            sent_at = core.clock()
            got = core.settle(op, (yield op) if core.allow() else SKIPPED)
            if got is FAILED:
                return False, sent_at
            if type(got) is not int:
                return got, sent_at
            # Held by a load of this process: a blocking wait on an event loop's thread is
            # refused (that load may be this very loop's, which cannot fill while it is
            # blocked). Held by another process: anyone may wait, as for any lease.
            signal.thread = ELSEWHERE if got < 0 else None
            got = abs(got)
            now = core.clock()
            if now + got / 1000.0 > lease_ends + 0.005:
                # A new lease (the holder died or failed, and another waiter took over):
                # its load deserves the same wait, up to twice the lease TTL in all.
                lease_ends = now + got / 1000.0
                deadline = min(max(deadline, lease_ends + 0.001), started + 2 * lease)
            left = deadline - now
            if left <= 0:
                core.counters.lease_timeouts += 1
                return False, sent_at
            timeout = min(got / 1000.0 + 0.001, left)
            if core.bus is None or not core.bus.connected.is_set():
                timeout, pause = min(timeout, pause), min(pause * 2, 0.25)
            core.counters.lease_waits += 1
            if (yield Wait(signal, timeout)) is False:  # refused: a sync call on an event loop
                return False, sent_at
    finally:
        if signal is not None:
            core.flights.drop_fill(signal)
