"""Stampede scenarios written once and run on an L1-only cache, the in-memory Redis of
tiercache.testing, fakeredis and a real redis-server (``backend``), through the sync and the
async driver (``mode``): a raising function's callers all get its exception, the hard timeout
serves the stale value, the soft timeout serves it while the load lands later, the soft
timeout waits when there is nothing stale, a raising function is answered with the stale value
within ``stale_ttl`` and never after an invalidation, ``refresh_after`` starts one background
refresh, cached errors stay in the process that cached them.

Redis expiry is stood in for by deleting the key behind the cache's back (no invalidation is
published) while the injected clock moves L1 past its TTLs."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support import WAIT, Boom, Clock, FakeRedisCaches, Gate, Joined, Loader, Pause, crowd, eventually
from tiercache import TieredCache, tiered

pytestmark = pytest.mark.parametrize(
    "backend", ["l1", "memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)], indirect=True
)

N = 8  # concurrent callers
HARD = 0.2  # a hard timeout that must elapse
SOFT = 0.05  # a soft timeout that must elapse
SLACK = 1.5  # how much later than its timeout a released caller may return (a slow CI machine)


def cache_on(backend: FakeRedisCaches, clock: Clock) -> TieredCache:
    """A cache whose L1 entries live as long as the function's ttl says (l1_ttl out of the way)."""
    cache: TieredCache = backend.cache(clock=clock, l1_ttl=1000)
    return cache


def expire(backend: FakeRedisCaches, key: str) -> None:
    """Redis expired ``key`` (nothing to do without Redis: the clock moved L1 past it)."""
    if backend.raw is not None:
        backend.raw.delete(key)


def stored(backend: FakeRedisCaches, cache: TieredCache, key: str) -> Any:
    """The value Redis holds under ``key`` (None when empty; raises on a lease marker)."""
    data = backend.raw.get(key)
    return None if data is None else cache._core.codec.decode(key, data)


@pytest.mark.parametrize("detached", [False, True], ids=["inline", "detached"])
def test_a_raising_function_gives_every_waiter_its_exception_and_caches_nothing(
    mode: Any, backend: FakeRedisCaches, joined: Joined, detached: bool
) -> None:
    """The leader's exception object is raised in every caller that waited for it; nothing is
    cached, in L1 or Redis (the lease is given back: another cache loads at once, without
    waiting); the next call calls the function again."""
    cache = backend.cache()
    error = Boom("upstream down")
    waiting = N if detached else N - 1  # detached: the first caller waits on the load as well
    loader = Loader(mode, Pause(error, until=joined.reach(waiting)), "recovered")
    f = tiered(cache, name="raising", hard_timeout=WAIT if detached else None)(loader.fn())
    key = f.key(1)
    results, _ = crowd(mode, N, lambda: f(1))
    assert all(r is error for r in results), results
    assert loader.calls == 1
    stats = cache.stats()
    assert stats.in_flight == 0
    assert stats.l1_size == 0
    assert stats.load_errors == 1
    assert stats.errors_cached == 0
    assert stats.lease_waits == 0
    assert cache._core.local.entry(key) is None
    if backend.raw is not None:
        assert backend.raw.get(key) is None  # no value and no lease marker left behind
        other = backend.cache()
        g = tiered(other, name="raising")(Loader(mode, "from the other cache").fn())
        assert mode.call(g, 1) == "from the other cache"
        assert other.stats().lease_waits == 0
        mode.call(f.invalidate, 1)
    assert mode.call(f, 1) == "recovered"
    assert loader.calls == 2


def test_hard_timeout_serves_the_stale_value(mode: Any, gate: Gate, backend: FakeRedisCaches, clock: Clock) -> None:
    """With a value within ``stale_ttl``, callers released by the hard timeout get it instead
    of LoadTimeoutError, each counted. (``gate`` before ``backend``: the caches close before the
    gate lets the abandoned sync load go on, not while it talks to fakeredis.)"""
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Pause("late", until=gate))
    f = tiered(cache, ttl=10, stale_ttl=100, hard_timeout=HARD)(loader.fn())
    assert mode.call(f, 1) == "v1"
    clock.advance(11)  # past the TTL, within stale_ttl
    expire(backend, f.key(1))
    results, elapsed = crowd(mode, N, lambda: f(1))
    assert results == ["v1"] * N
    assert HARD <= elapsed < HARD + SLACK
    # (async: a waiter whose deadline had not quite come when another's timeout cancelled the
    # load may have started another: see test_hard_timeout_bounds_every_callers_wait)
    assert loader.calls == 2 or (mode.is_async and loader.calls >= 2)
    stats = cache.stats()
    assert stats.stale_served == N
    assert stats.load_timeouts == N
    assert stats.in_flight == 0
    if mode.is_async:
        eventually(loader.cancelled.is_set, "the hanging async load to be cancelled", mode=mode)


def test_soft_timeout_serves_stale_then_the_load_lands_in_l1_and_redis(
    mode: Any, backend: FakeRedisCaches, clock: Clock, gate: Gate
) -> None:
    """Past ``soft_timeout`` callers with a stale value answer with it; the load goes on in the
    background, and its result lands in L1 (and Redis) and is served."""
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Pause("v2", until=gate), "v2")
    f = tiered(cache, ttl=10, stale_ttl=100, soft_timeout=SOFT, hard_timeout=WAIT)(loader.fn())
    key = f.key(1)
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    expire(backend, key)
    started = time.monotonic()
    assert mode.call(f, 1) == "v1"
    assert SOFT <= time.monotonic() - started < SOFT + SLACK
    assert cache.stats().in_flight == 1  # the load goes on
    results, elapsed = crowd(mode, 3, lambda: f(1))  # others join the load, and answer stale too
    assert results == ["v1"] * 3
    assert SOFT <= elapsed < SOFT + SLACK
    assert cache.stats().stale_served == 4
    assert loader.calls == 2
    gate.open()
    eventually(lambda: cache._core.local.get(key) == "v2", "the background load to land in L1", mode=mode)
    if backend.raw is not None:
        assert stored(backend, cache, key) == "v2"
    assert mode.call(f, 1) == "v2"
    assert loader.calls == 2
    stats = cache.stats()
    assert stats.in_flight == 0
    assert stats.load_timeouts == 0
    assert stats.stale_served == 4


def test_soft_timeout_without_stale_waits_for_the_load(mode: Any, backend: FakeRedisCaches, clock: Clock) -> None:
    """Without a stale value the soft timeout does not release callers: they wait for the load
    (which outlasts soft_timeout but not hard_timeout) and get its value, which is stored."""
    cache = cache_on(backend, clock)
    loader = Loader(mode, Pause("slow value", seconds=4 * SOFT))
    f = tiered(cache, soft_timeout=SOFT, hard_timeout=WAIT)(loader.fn())
    results, elapsed = crowd(mode, 3, lambda: f(1))
    assert results == ["slow value"] * 3
    assert elapsed >= 4 * SOFT
    assert loader.calls == 1
    stats = cache.stats()
    assert stats.stale_served == 0
    assert stats.load_timeouts == 0
    assert stats.in_flight == 0
    if backend.raw is not None:
        assert stored(backend, cache, f.key(1)) == "slow value"


def test_stale_value_served_when_the_function_raises_within_stale_ttl(
    mode: Any, backend: FakeRedisCaches, clock: Clock
) -> None:
    """After expiry, a raising function is answered with the value within ``stale_ttl`` (each
    time counted; the failed loads give their leases back); past ``stale_ttl`` the error
    propagates."""
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Boom("down"))
    f = tiered(cache, ttl=10, stale_ttl=100)(loader.fn())
    key = f.key(1)
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    expire(backend, key)
    assert mode.call(f, 1) == "v1"
    assert mode.call(f, 1) == "v1"
    stats = cache.stats()
    assert stats.stale_served == 2
    assert stats.load_errors == 2
    assert stats.in_flight == 0
    assert loader.calls == 3
    if backend.raw is not None:
        assert backend.raw.get(key) is None  # no lease marker left behind
    clock.advance(100)  # past TTL + stale_ttl
    with pytest.raises(Boom):
        mode.call(f, 1)
    assert cache.stats().stale_served == 2


@pytest.mark.parametrize("when", ["after expiry", "before expiry"])
def test_invalidation_removes_the_stale_copy(mode: Any, backend: FakeRedisCaches, clock: Clock, when: str) -> None:
    """After ``f.invalidate(x)`` the stale copy is gone: a raising function's error propagates."""
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Boom("down"))
    f = tiered(cache, ttl=10, stale_ttl=100)(loader.fn())
    assert mode.call(f, 1) == "v1"
    if when == "before expiry":
        mode.call(f.invalidate, 1)
    clock.advance(11)
    expire(backend, f.key(1))
    if when == "after expiry":
        mode.call(f.invalidate, 1)
    with pytest.raises(Boom):
        mode.call(f, 1)
    assert cache.stats().stale_served == 0


def test_without_stale_ttl_the_error_propagates(mode: Any, backend: FakeRedisCaches, clock: Clock) -> None:
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Boom("down"))
    f = tiered(cache, ttl=10)(loader.fn())
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    expire(backend, f.key(1))
    with pytest.raises(Boom):
        mode.call(f, 1)
    assert cache.stats().stale_served == 0


def test_refresh_after_starts_one_background_refresh(
    mode: Any, gate: Gate, backend: FakeRedisCaches, clock: Clock
) -> None:
    """Past ``refresh_after``, concurrent callers get the current value at once (the refresh is
    held, so a caller that waited for it would time out) and exactly one refresh runs; once it
    lands (in L1, and in Redis with a new TTL) the new value is served."""
    cache = cache_on(backend, clock)
    loader = Loader(mode, "v1", Pause("v2", until=gate), "v3")
    f = tiered(cache, ttl=10, refresh_after=5)(loader.fn())
    key = f.key(1)
    assert mode.call(f, 1) == "v1"
    clock.advance(4)
    assert mode.call(f, 1) == "v1"
    assert cache.stats().refreshes_ahead == 0
    clock.advance(2)  # past refresh_after, before the TTL
    results, elapsed = crowd(mode, N, lambda: f(1))
    assert results == ["v1"] * N
    assert elapsed < SLACK
    eventually(lambda: loader.calls == 2, "the background refresh to call the function", mode=mode)
    assert mode.call(f, 1) == "v1"  # still the current value while the refresh runs
    assert cache.stats().refreshes_ahead == 1
    gate.open()
    eventually(lambda: cache._core.local.get(key) == "v2", "the refresh to land", mode=mode)
    eventually(lambda: not cache._core.refreshing, "the refresh to end", mode=mode)
    if backend.raw is not None:
        assert stored(backend, cache, key) == "v2"
        assert 5_000 < backend.raw.pttl(key) <= 10_000
    assert mode.call(f, 1) == "v2"
    assert loader.calls == 2
    stats = cache.stats()
    assert stats.refreshes_ahead == 1
    assert stats.loads == 2
    clock.advance(4)  # the refreshed entry has its own refresh point, 5 s after its fill
    assert mode.call(f, 1) == "v2"
    assert cache.stats().refreshes_ahead == 1


def test_cached_errors_stay_in_this_process(mode: Any, backend: FakeRedisCaches, clock: Clock) -> None:
    """A listed exception is raised again from this process's L1 for ``error_ttl`` (the function
    is not called); other exceptions are not cached; Redis keeps nothing (no value, no lease),
    so another cache on the same Redis calls the function itself, without waiting."""
    cache, other = cache_on(backend, clock), cache_on(backend, clock)
    loader = Loader(mode, KeyError("user 404"))
    f = tiered(cache, cache_errors=(KeyError,), error_ttl=30, name="user")(loader.fn())
    for _ in range(3):
        with pytest.raises(KeyError):
            mode.call(f, 404)
    assert loader.calls == 1
    assert cache.stats().errors_cached == 1
    if backend.raw is not None:
        assert backend.raw.get(f.key(404)) is None
    other_loader = Loader(mode, KeyError("user 404"))
    g = tiered(other, cache_errors=(KeyError,), error_ttl=30, name="user")(other_loader.fn())
    with pytest.raises(KeyError):
        mode.call(g, 404)
    assert other_loader.calls == 1
    assert other.stats().errors_cached == 1
    assert other.stats().lease_waits == 0
    uncached = Loader(mode, ValueError("bad"), ValueError("bad again"), "ok")
    h = tiered(cache, cache_errors=(KeyError,), name="other")(uncached.fn())
    with pytest.raises(ValueError, match="bad"):
        mode.call(h, 1)
    with pytest.raises(ValueError, match="bad again"):
        mode.call(h, 1)
    assert mode.call(h, 1) == "ok"
    assert uncached.calls == 3
    assert cache.stats().errors_cached == 1
