"""The single-key read: L1, else one caller per key and process leads the load (the others
join it, or serve a stale copy past a timeout), which reads Redis (taking the key's lease on
a miss, or waiting for another process's) and else calls the function and stores its result.
"""

from __future__ import annotations

import threading
from typing import Any

from . import _remote, _write
from ._core import LOADING, Core, ms, pttl_seconds
from ._flight import Flight
from ._lease import await_other
from ._local import FRESH_UNTIL, STALE_UNTIL, VALID_UNTIL, VALUE
from ._policy import CachedError, Policy
from ._steps import Flow, Spawn, Wait
from ._types import CALL, MISSING, RETRY, SKIPPED, SOLO
from .errors import BackendError, LoadTimeoutError

__all__ = ["get", "read_through"]


def get(core: Core, key: str) -> Flow[Any]:
    """L1, else L2; MISSING when neither has ``key``. (Decorated functions inline the L1 step.)"""
    value = core.local.get(key)
    if value is not MISSING:
        core.counters.l1_hits += 1
        return value
    return (yield from read_through(core, key, core.default_policy, False))


def read_through(core: Core, key: str, policy: Policy, load: bool) -> Flow[Any]:  # noqa: C901 - the read hot path, kept in one frame
    """L2, else the function (when ``load``), single-flighted per key. L1 was checked already.

    Returns the value, or MISSING when ``load`` is false and neither tier has it.
    """
    stale: Any = MISSING
    if policy.inspect:
        entry = core.local.entry(key)
        if entry is not None:
            value, now = entry[VALUE], core.clock()
            if now < entry[VALID_UNTIL]:
                if type(value) is CachedError:
                    raise value.error
                # Past fresh_until but not expired: answer now, refresh in the background.
                core.counters.l1_hits += 1
                if load:
                    yield from _refresh_ahead(core, key, policy)
                return value
            if now < entry[STALE_UNTIL] and type(value) is not CachedError:
                stale = value
    if key in LOADING.get():  # called from the loader of this very key
        return (yield from _solo(core, key, policy, load, stale))
    started = core.clock()  # timeouts count from the call, across retries
    bounded = True  # a caller outwaits lease_ttl once (see Core.await_leader)
    while True:
        flight, leader = core.flights.lead_or_join(key)
        if leader:
            flight.stale = stale
            if not (load and policy.detached):
                return (yield from _lead(core, flight, key, policy, load))
            # With timeouts the load runs detached and this caller waits like any other,
            # so it can stop waiting (and take the stale value) while the load goes on.
            yield Spawn(_lead(core, flight, key, policy, load), flight)
        value = yield from _join(
            core, flight, policy, flight.stale if stale is MISSING else stale, load, started, bounded
        )
        bounded = bounded and flight.done
        if value is SOLO:
            return (yield from _solo(core, key, policy, load, stale))
        if value is not RETRY:
            return value


def _solo(core: Core, key: str, policy: Policy, load: bool, stale: Any) -> Flow[Any]:
    """Load ``key`` for a caller that must not wait for the load in flight, because that
    load waits for it: the caller is inside that load's function (re-entrancy), or is a
    sync call blocking the event loop that runs it. It reads Redis (taking the lease if
    the key is empty, never waiting for another's) and computes if it must, outside the
    in-flight table: through a watch, so an invalidation meanwhile keeps it out of L1. A
    stale copy is served if the function fails, as for any load; the timeouts do not apply
    (the caller could not wait for a detached load anyway)."""
    watches = core.flights.watch([key])
    watches[0].stale = stale
    try:
        return (yield from _lead(core, watches[0], key, policy, load))
    finally:
        core.flights.unwatch(watches)


def _lead(core: Core, flight: Flight, key: str, policy: Policy, load: bool) -> Flow[Any]:
    """The load of ``key`` for every caller waiting on ``flight``. The flight always ends
    and always leaves the table, whatever is raised (cancellation included)."""
    flight.thread = threading.get_ident()  # (a worker's, when detached)
    try:
        value = core.local.get(key)  # filled between our L1 miss and taking the lead?
        if value is MISSING:
            value = yield from _load(core, flight, key, policy, load)
    except Exception as exc:
        core.flights.release(flight)
        if not isinstance(exc, BackendError) and _still_stale(core, key, flight.stale):
            # An inline leader is a caller too; a detached one is not (its callers count).
            why = f"the function raised {type(exc).__name__}: {exc}"
            _serve_stale(core, policy, why, count=not (load and policy.detached))
            flight.served_stale = True
            flight.finish(flight.stale)
            return flight.stale
        if policy.cache_errors and isinstance(exc, policy.cache_errors):
            core.counters.errors_cached += 1
            expires = core.clock() + policy.error_ttl
            core.flights.fill(flight, CachedError(exc), expires, 0, fresh_until=0.0)
        flight.fail(exc)
        raise
    except BaseException:
        core.flights.release(flight)
        flight.abandon()  # the waiters try again, one of them as the new leader
        raise
    core.flights.release(flight)
    flight.finish(value)
    if policy.early and load:
        entry = core.local.entry(key)  # an L2 hit already due for its refresh
        if entry is not None and entry[FRESH_UNTIL] <= core.clock() < entry[VALID_UNTIL]:
            yield from _refresh_ahead(core, key, policy)
    return value


def _join(  # noqa: C901, PLR0911 - the join hot path: one exit per way a wait ends
    core: Core, flight: Flight, policy: Policy, stale: Any, load: bool, started: float, bounded: bool = True
) -> Flow[Any]:
    """Wait for another caller's load of the key; RETRY when it ended without an answer,
    SOLO when this caller may not wait for it (a sync driver refuses a wait that would never
    end; see ``_sync.wait``)."""
    soft, hard = (policy.soft_timeout, policy.hard_timeout) if load else (None, None)
    if soft is not None:
        if (yield Wait(flight, max(0.0, soft - (core.clock() - started)))) is False:
            return SOLO
        if not flight.done and _still_stale(core, flight.key, stale):
            _serve_stale(core, policy, f"the function ran past soft_timeout={soft} s")
            return stale
    if hard is not None:
        if not flight.done and (yield Wait(flight, max(0.0, hard - (core.clock() - started)))) is False:
            return SOLO
        if not flight.done:
            return (yield from _time_out(core, flight, policy, stale, hard))
    elif not (yield from core.await_leader(flight, bounded)):
        return SOLO
    if not flight.done:  # past lease_ttl: this caller retries, leading a new load or joining one
        return RETRY
    if flight.abandoned:  # the leader was cancelled: try again, maybe as the leader
        return RETRY
    if load and flight.value is MISSING and flight.error is None:
        return RETRY  # we joined a cache.get() (which may not load) that found nothing
    if flight.error is not None:
        raise flight.error
    if flight.served_stale:
        core.counters.stale_served += 1
    return flight.value


def _time_out(core: Core, flight: Flight, policy: Policy, stale: Any, hard: float) -> Flow[Any]:
    """The load outlasted ``hard_timeout``: detach it, keep its late result out of both
    tiers, and answer with the stale value, else raise LoadTimeoutError."""
    core.counters.load_timeouts += 1
    core.flights.release(flight)  # the next call starts a new load
    flight.dirty = True  # and the late result, if any, stays out of L1
    flight.timed_out = True  # and out of Redis
    if flight.cancel is not None:
        flight.cancel()
    if flight.marker:  # and may take the lease (a late fill is then refused)
        yield from core.release([flight.key], flight.marker)
    if _still_stale(core, flight.key, stale):
        _serve_stale(core, policy, f"the function ran past hard_timeout={hard} s")
        return stale
    raise LoadTimeoutError(
        f"{policy.name} did not return within hard_timeout={hard} s; raise hard_timeout, "
        f"or give stale_ttl to answer with the last value instead"
    )


def _still_stale(core: Core, key: str, stale: Any) -> bool:
    """Whether ``stale`` may still be served for ``key``: L1 still holds that very copy
    within its ``stale_ttl`` (an invalidation since would have removed it)."""
    if stale is MISSING:
        return False
    entry = core.local.entry(key)
    return entry is not None and entry[VALUE] is stale and core.clock() < entry[STALE_UNTIL]


def _serve_stale(core: Core, policy: Policy, why: str, count: bool = True) -> None:
    if count:
        core.counters.stale_served += 1
    core.log.emit("stale", "tiercache: answering %s with a stale value: %s", policy.name, why)


def _refresh_ahead(core: Core, key: str, policy: Policy) -> Flow[None]:
    """Start one background refresh of ``key`` unless one is running here. It is not a
    flight of the in-flight table: callers that come after the entry expired load it
    themselves rather than wait for a refresh that may still be queued."""
    with core.refreshing_lock:
        if key in core.refreshing:
            return
        core.refreshing.add(key)
    core.counters.refreshes_ahead += 1
    yield Spawn(_ahead(core, key, policy), Flight(key))


def _ahead(core: Core, key: str, policy: Policy) -> Flow[Any]:
    try:
        return (yield from _write.refresh(core, key, policy, exclusive=True))
    except Exception as exc:  # noqa: BLE001 - nobody waits for it: counted and logged
        core.log.emit("refresh", "tiercache: refresh ahead of %s failed: %r", policy.name, exc)
        return None
    finally:
        with core.refreshing_lock:
            core.refreshing.discard(key)


def _load(core: Core, flight: Flight, key: str, policy: Policy, load: bool) -> Flow[Any]:
    """Read ``key`` from Redis (taking its lease on a miss when ``load``); a hit goes into
    L1, a miss is computed and stored (``_compute``). Returns the value, or MISSING when
    not ``load`` and Redis has none."""
    marker = core.mint_marker() if load else b""
    mine = load  # whether our marker may be in the key (unknown until the read's reply)
    try:
        op = _remote.fetch(key, marker, core.lease_ms) if load else _remote.peek(key)
        sent_at = core.clock()
        found = core.settle(op, (yield op) if core.allow() else SKIPPED)
        if found is False and load and key not in LOADING.get():  # (not our own lease)
            found, sent_at = yield from await_other(core, key, marker)
        mine = found is True
        if mine:
            flight.marker = marker  # a hard timeout may give the lease back
        unreadable: bytes | None = None
        if isinstance(found, tuple):
            data, pttl = found
            value = core.decode(key, data)
            if value is not MISSING:
                core.counters.l2_hits += 1
                # An L1 copy never outlives its L2 copy: the TTL left in Redis came in the same
                # reply, measured by Redis after we sent the request, so an expiry fixed from
                # the moment we sent it (not from now, after the reply and decoding) errs early.
                _fill(core, flight, value, core.codec.held_size(data), policy, sent_at, pttl_seconds(pttl))
                return value
            unreadable = data
        core.counters.misses += 1
        if not load:
            return MISSING
        value, data, ttl_s, sent_at = yield from _compute(core, flight, key, policy, marker, mine, unreadable)
        mine = False
    except BaseException:
        # Cancelled (or failed) while our marker may be in the key: give it back now rather
        # than leave this and every other process waiting for its lease TTL. The script
        # deletes only our own marker, so this is safe whatever the key holds.
        if mine:
            yield from core.release([key], marker)
        raise
    if data is not None:
        # invariant 2: fill() keeps a load overtaken by an invalidation out of L1. The Redis
        # copy's TTL started after sent_at, so L1's, counted from sent_at, ends no later.
        _fill(core, flight, value, core.codec.held_size(data), policy, sent_at, ttl_s)
    return value


def _compute(
    core: Core, flight: Flight, key: str, policy: Policy, marker: bytes, leased: bool, unreadable: bytes | None
) -> Flow[tuple[Any, bytes | None, float, float]]:
    """Call the function and store its result in Redis: where our lease (``leased``) still
    holds, or over the ``unreadable`` bytes it found. Returns ``(value, bytes to put in L1
    or None, ttl, sent_at)``."""
    value = yield from core.call(policy, CALL, (key,))
    data = core.encode_or_none(key, value)
    if data is None or flight.timed_out:  # not cacheable, or its callers gave up: store nothing
        if leased:  # (and free the key)
            yield from core.release([key], marker)
        return value, None, 0.0, 0.0
    ttl_s = policy.l2_ttl()
    sent_at = core.clock()
    if leased:
        # invariant 3: lands only if no write or invalidation of the key came since the
        # miss (they replace our lease marker). The lease, not our local dirty mark,
        # decides: a local flush on resubscribe says nothing about Redis.
        op = _remote.fill(key, marker, data, ms(ttl_s), core.channel, core.node_id)
        if core.settle(op, (yield op) if core.allow() else SKIPPED) is False:
            return value, None, 0.0, sent_at  # refused: the key was written since our miss
    elif unreadable is not None:
        # Replace the unreadable bytes, unless someone wrote the key meanwhile.
        op = _remote.replace(key, unreadable, data, ms(ttl_s))
        core.settle(op, (yield op) if core.allow() else SKIPPED)
    return value, data, ttl_s, sent_at


def _fill(core: Core, flight: Flight, value: Any, size: int, policy: Policy, sent_at: float, left: float) -> None:
    """Into L1 (unless overtaken), for at most the ``left`` seconds Redis keeps it from ``sent_at``."""
    expires = sent_at + left
    stale_until = expires + policy.stale_ttl if policy.stale_ttl else None
    fresh_until = policy.fresh_until(expires)
    core.flights.fill(flight, value, sent_at + min(policy.l1_ttl, left), size, fresh_until, stale_until)
