"""Stampede protection in one process against a real redis-server: single-flight of 1,000
callers, cancelled and failing leaders, hard and soft timeouts, stale values, refresh ahead of
expiry, TTL jitter in Redis, negative caching, and the circuit breaker with the server down.

Scenarios with callers run through the sync driver (threads) and the async driver (tasks) via
``mode``. (A raising function's waiters, stale values with timeouts or on errors, one refresh
after ``refresh_after``, negative caching, written once for L1-only caches, fakeredis and real
Redis: test_stampede_backends.py.) Redis expiry is stood in for by deleting the key behind the
cache's back (no invalidation is published) while an injected clock moves L1 past its TTLs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.support import (
    WAIT,
    AsyncOnly,
    Boom,
    Clock,
    Gate,
    Joined,
    Loader,
    Pause,
    aeventually,
    crowd,
    eventually,
    ready,
)
from tiercache import MISSING, LoadTimeoutError, TieredCache, tiered
from tiercache._async import AsyncRedis

pytestmark = pytest.mark.redis

N = 8
HARD = 0.2
SOFT = 0.05
SLACK = 1.5  # how much later than its timeout a released caller may return (a slow CI machine)


def stored(cache: TieredCache, raw: redis.Redis, key: str) -> Any:
    """The value Redis holds under ``key`` (None when empty; raises on a lease marker)."""
    data = raw.get(key)
    return None if data is None else cache._core.codec.decode(key, data)


@pytest.fixture
def async_cache(redis_server: Any, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    """For scenarios that exist only in asyncio (each runs its own ``asyncio.run``): caches on
    the session server, subscribed, closed at teardown."""
    made: list[TieredCache] = []

    def make(**kwargs: Any) -> TieredCache:
        kwargs.setdefault("namespace", namespace)
        cache = ready(TieredCache(redis_server.url, **kwargs))
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


# -- 1. a thousand callers, one call ------------------------------------------------------------


def test_thousand_concurrent_callers_call_the_function_once(
    mode: Any, make_cache: Callable[..., TieredCache], raw: redis.Redis, joined: Joined
) -> None:
    """1,000 threads (sync) or tasks (async) miss one cold key together; the function holds its
    load until the other 999 are provably waiting for it, so they all overlap. It is called
    once, every caller gets its value, Redis holds it, and the in-flight table is empty."""
    cache = make_cache()
    callers = 1000
    calls: list[int] = []

    if mode.is_async:

        @tiered(cache)
        async def report(day: int) -> dict[str, int]:
            calls.append(day)
            await joined.ablock(callers - 1)
            return {"day": day, "rows": 42}

    else:

        @tiered(cache)
        def report(day: int) -> dict[str, int]:
            calls.append(day)
            joined.block(callers - 1)
            return {"day": day, "rows": 42}

    results, _ = crowd(mode, callers, lambda: report(7))
    assert calls == [7]
    assert results == [{"day": 7, "rows": 42}] * callers
    stats = cache.stats()
    assert stats.in_flight == 0
    assert stats.loads == 1
    assert stats.misses == 1
    # They waited in this process, not on the leader's lease in Redis (one round trip in all).
    assert stats.lease_waits == 0
    assert stats.l2_hits == 0
    assert stored(cache, raw, report.key(7)) == {"day": 7, "rows": 42}
    assert mode.call(report, 7) == {"day": 7, "rows": 42}
    assert calls == [7]


# -- 2. a cancelled leader ----------------------------------------------------------------------


def test_cancelled_async_leader_hands_over_and_gives_its_lease_back(
    async_cache: Callable[..., TieredCache], raw: redis.Redis, joined: Joined, gate: Gate
) -> None:
    """The task leading a load is cancelled mid-call: its lease in Redis is given back, one
    waiter takes the load over at once (not after ``lease_ttl``), and every waiter gets the
    value, which Redis then holds."""
    cache = async_cache(lease_ttl=3.0)
    loader = Loader(AsyncOnly(), Pause("never returned", until=gate), "taken over")
    f = tiered(cache)(loader.fn())
    key = f.key(1)

    async def scenario() -> float:
        leader = asyncio.ensure_future(f(1))
        await aeventually(lambda: loader.calls == 1, "the leader to call the function")
        assert raw.get(key) is not None  # the leader's lease marker
        waiters = [asyncio.ensure_future(f(1)) for _ in range(N)]
        await joined.ablock(N)
        cancelled_at = time.monotonic()
        leader.cancel()
        assert await asyncio.wait_for(asyncio.gather(*waiters), WAIT) == ["taken over"] * N
        took = time.monotonic() - cancelled_at
        with pytest.raises(asyncio.CancelledError):
            await leader
        await cache.aclose()
        return took

    took = asyncio.run(scenario())
    assert took < 1.0, f"the waiters were answered {took:.2f} s after the leader was cancelled"
    assert loader.cancelled.is_set()
    assert loader.calls == 2
    stats = cache.stats()
    assert stats.in_flight == 0
    assert stats.lease_waits == 0
    assert stored(cache, raw, key) == "taken over"


def test_leader_cancelled_before_its_lease_reply_does_not_stall_waiters(
    async_cache: Callable[..., TieredCache], raw: redis.Redis, joined: Joined, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's read took the lease in Redis (``SET NX ... GET``) but the task is cancelled
    before the reply arrives (a slow network). Its lease marker must not be left behind for the
    waiters of this very process to wait on until ``lease_ttl`` runs out: one of them takes
    the load over at once."""
    cache = async_cache(lease_ttl=2.0)
    replied = threading.Event()
    original = AsyncRedis.execute

    async def slow_first_read(self: AsyncRedis, op: Any) -> Any:
        reply = await original(self, op)
        if op.args[0] == "SET" and not replied.is_set():
            replied.set()
            await asyncio.sleep(3600)  # the reply is still on its way when the task is cancelled
        return reply

    monkeypatch.setattr(AsyncRedis, "execute", slow_first_read)
    loader = Loader(AsyncOnly(), "loaded")
    f = tiered(cache)(loader.fn())
    key = f.key(1)

    async def scenario() -> float:
        leader = asyncio.ensure_future(f(1))
        await aeventually(replied.is_set, "the leader's read to reach Redis")
        assert raw.get(key) is not None  # Redis ran the SET: the lease marker is there
        waiters = [asyncio.ensure_future(f(1)) for _ in range(N)]
        await joined.ablock(N)
        cancelled_at = time.monotonic()
        leader.cancel()
        results = await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
        took = time.monotonic() - cancelled_at
        assert results == ["loaded"] * N
        with pytest.raises(asyncio.CancelledError):
            await leader
        await cache.aclose()
        return took

    took = asyncio.run(scenario())
    assert took < 1.0, (
        f"the waiters were answered {took:.2f} s after the leader was cancelled: they waited for "
        f"the cancelled leader's own lease marker to expire (lease_ttl=2.0)"
    )
    assert loader.calls == 1
    assert cache.stats().in_flight == 0


# -- 3-4. a raising function (test_stampede_backends.py), hard timeout --------------------------


def test_hard_timeout_releases_waiters_with_load_timeout_error(
    mode: Any, make_cache: Callable[..., TieredCache], raw: redis.Redis, gate: Gate
) -> None:
    """A hanging load releases all its callers at ``hard_timeout`` with LoadTimeoutError, and
    its lease is given back, so the next call (in any process) loads at once. In async mode the
    load is cancelled; in sync mode it runs on in its worker thread, and when it returns its
    result is stored nowhere (its lease is gone, and it stays out of L1)."""
    cache = make_cache()
    loader = Loader(mode, Pause("late", until=gate))
    f = tiered(cache, hard_timeout=HARD)(loader.fn())
    key = f.key(1)
    results, elapsed = crowd(mode, N, lambda: f(1))
    assert all(isinstance(r, LoadTimeoutError) for r in results), results
    assert HARD <= elapsed < HARD + SLACK
    assert cache.stats().load_timeouts == N
    assert cache.stats().in_flight == 0
    if mode.is_async:
        # (A waiter whose deadline had not quite come when another's timeout cancelled the load
        # may have started another: see the unit test test_hard_timeout_bounds_every_callers_wait.)
        eventually(loader.cancelled.is_set, "the hanging load to be cancelled", mode=mode)
        eventually(lambda: raw.get(key) is None, "the cancelled load's lease to be given back", mode=mode)
        hung = loader.calls
        loader.outcomes = ["fresh"]  # from now on the function answers at once
        assert mode.call(f, 1) == "fresh"
        assert loader.calls == hung + 1
        assert stored(cache, raw, key) == "fresh"
    else:
        assert loader.calls == 1
        eventually(lambda: raw.get(key) is None, "the timed-out load's lease to be given back", mode=mode)
        gate.open()
        assert loader.returned.wait(WAIT)
        assert raw.get(key) is None, "the late result of a timed-out load was stored"
        assert cache._core.local.get(key) is MISSING, "the late result of a timed-out load entered L1"
        loader.outcomes = ["fresh"]
        assert mode.call(f, 1) == "fresh"
        assert loader.calls == 2


# -- 5-6. soft timeout, stale values (the rest: test_stampede_backends.py) ---------------------


def test_invalidation_by_another_cache_removes_the_stale_copy(
    mode: Any, make_cache: Callable[..., TieredCache], raw: redis.Redis, clock: Clock
) -> None:
    """An invalidation from another process (heard on the bus) drops the stale copy as well."""
    cache = make_cache(clock=clock)
    other = make_cache()
    loader = Loader(mode, "v1", Boom("down"))
    f = tiered(cache, ttl=30, stale_ttl=600, name="priced")(loader.fn())
    key = f.key(1)
    assert mode.call(f, 1) == "v1"
    clock.advance(31)
    raw.delete(key)
    result = other.invalidate(key, wait=True, timeout=WAIT)
    assert result.complete
    with pytest.raises(Boom):
        mode.call(f, 1)
    assert cache.stats().stale_served == 0


# -- 7. refresh ahead ---------------------------------------------------------------------------


def test_refresh_ahead_runs_in_one_cache_of_two(
    mode: Any, make_cache: Callable[..., TieredCache], raw: redis.Redis, clock: Clock, gate: Gate
) -> None:
    """Two caches (processes) due for a refresh of one key at once: the second finds the
    first's refresh token and does not call the function; the first's result reaches both."""
    first = make_cache(clock=clock)
    second = make_cache(clock=clock)
    loaders = [Loader(mode, "v1", Pause("v2", until=gate), "v2"), Loader(mode, "second's")]
    f1 = tiered(first, ttl=60, refresh_after=30, name="shared")(loaders[0].fn())
    f2 = tiered(second, ttl=60, refresh_after=30, name="shared")(loaders[1].fn())
    key = f1.key(1)
    assert mode.call(f1, 1) == "v1"
    assert mode.call(f2, 1) == "v1"  # from Redis
    assert loaders[1].calls == 0
    clock.advance(31)
    assert mode.call(f1, 1) == "v1"
    eventually(lambda: loaders[0].calls == 2, "the first cache's refresh to start", mode=mode)
    assert mode.call(f2, 1) == "v1"
    eventually(lambda: not second._core.refreshing, "the second cache's refresh attempt to end", mode=mode)
    assert loaders[1].calls == 0
    gate.open()
    eventually(lambda: stored(first, raw, key) == "v2", "the refresh to land in Redis", mode=mode)
    eventually(lambda: second._core.local.entry(key) is None, "the second cache to drop its copy", mode=mode)
    assert mode.call(f2, 1) == "v2"
    assert loaders[1].calls == 0
    assert loaders[0].calls == 2


# -- 8. TTL jitter ------------------------------------------------------------------------------


def test_ttl_jitter_spreads_redis_ttls_within_bounds(
    mode: Any, make_cache: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """Each fill's PTTL lies in [ttl*(1-j), ttl], and 50 fills do not all get the same one."""
    cache = make_cache()
    f = tiered(cache, ttl=100, ttl_jitter=0.2)(Loader(mode, "v").fn())
    for i in range(50):
        mode.call(f, i)
    pttls = [raw.pttl(f.key(i)) for i in range(50)]
    assert all(80_000 - 1_000 <= p <= 100_000 for p in pttls), pttls
    assert len(set(pttls)) > 25, pttls
    assert max(pttls) - min(pttls) > 5_000, pttls
    lefts = [cache._core.local.ttl_left(f.key(i)) for i in range(50)]  # L1 follows, capped by l1_ttl
    assert all(left is not None and left <= 60 for left in lefts)


# -- 9-10. negative caching (test_stampede_backends.py), the circuit breaker --------------------------


def test_breaker_opens_with_redis_down_and_closes_after_a_probe(
    mode: Any, own_redis: Any, own_raw: redis.Redis, namespace: str
) -> None:
    """With the server killed, ``breaker_threshold`` failed calls open the breaker; while open,
    calls skip Redis (no more failures counted, answered fast by the function); once the
    cooldown passes and the server is back, one probe closes it and values reach Redis again."""
    clock = Clock(500.0, frozen=True)
    cache = TieredCache(
        own_redis.url,
        namespace=namespace,
        coherent=False,
        breaker_threshold=3,
        breaker_cooldown=5.0,
        socket_timeout=0.25,
        connect_timeout=0.25,
        clock=clock,
    )
    try:
        loader = Loader(mode, "answer")
        f = tiered(cache)(loader.fn())
        assert mode.call(f, 0) == "answer"
        assert own_raw.get(f.key(0)) is not None
        own_redis.kill()
        for i in range(1, 4):
            assert mode.call(f, i) == "answer"
        assert cache.stats().backend_errors == 3
        assert cache._core.breaker.is_open
        started = time.monotonic()
        for i in range(4, 54):
            assert mode.call(f, i) == "answer"
        assert time.monotonic() - started < 0.5  # no connects, no timeouts
        assert cache.stats().backend_errors == 3
        clock.advance(5.0)  # one probe, which fails: open for another cooldown
        assert mode.call(f, 54) == "answer"
        assert cache.stats().backend_errors == 4
        assert mode.call(f, 55) == "answer"
        assert cache.stats().backend_errors == 4
        own_redis.start()
        assert mode.call(f, 56) == "answer"
        assert own_raw.get(f.key(56)) is None  # still open
        clock.advance(5.0)
        assert mode.call(f, 57) == "answer"  # the probe succeeds
        assert not cache._core.breaker.is_open
        assert mode.call(f, 58) == "answer"
        assert own_raw.get(f.key(57)) is not None
        assert own_raw.get(f.key(58)) is not None
        assert cache.stats().backend_errors == 4
        assert loader.calls == 59
    finally:
        if mode.is_async:
            mode.run(cache.aclose())
        else:
            cache.close()
