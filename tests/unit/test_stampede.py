"""Stampede protection in one process, on L1-only caches and fakeredis: single-flight of detached
loads, cancelled and failing leaders, stale values, soft and hard timeouts, refresh ahead of
expiry (refresh_after and XFetch), TTL jitter, negative caching, the circuit breaker, and the
validation of the new arguments. Every scenario with callers runs through the sync driver
(threads) and the async driver (tasks) via ``mode``. (A raising function's waiters, stale values
with timeouts or on errors, one refresh after ``refresh_after``, cached errors staying in their
process, written once for L1-only caches, fakeredis and real Redis: test_stampede_backends.py in
tests/integration.)"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

import tiercache._policy
from tests.support import WAIT, AsyncOnly, Boom, Clock, Gate, Joined, Loader, Pause, aeventually, crowd, eventually
from tiercache import ConfigError, LoadTimeoutError, TieredCache, tiered
from tiercache._async import AsyncRedis
from tiercache._sync import SyncRedis

N = 8  # concurrent callers in the scenarios below
HARD = 0.2  # a hard timeout that must elapse
SOFT = 0.05  # a soft timeout that must elapse
SLACK = 1.5  # how much later than its timeout a released caller may return (a slow CI machine)


ASYNC = AsyncOnly()


@pytest.fixture
def l1(clock: Clock) -> Iterator[TieredCache]:
    """An L1-only cache on the test's clock."""
    cache = TieredCache(namespace="stampede", clock=clock, l1_ttl=1000)
    yield cache
    cache.close()


# -- single-flight of detached loads, failing and cancelled leaders --------------------------


def test_detached_load_is_single_flight(mode: Any, l1: TieredCache, joined: Joined) -> None:
    """With a timeout set the load runs detached and every caller, the first included, waits on
    it: N concurrent misses still call the function once and all get its value."""
    loader = Loader(mode, Pause(["v"], until=joined.reach(N)))
    f = tiered(l1, hard_timeout=WAIT)(loader.fn())
    results, _ = crowd(mode, N, lambda: f(1))
    assert results == [["v"]] * N
    assert loader.calls == 1
    assert mode.call(f, 1) == ["v"]  # an L1 hit now
    assert loader.calls == 1
    stats = l1.stats()
    assert stats.in_flight == 0
    assert stats.loads == 1
    assert stats.load_timeouts == 0


def test_cancelled_async_leader_hands_the_load_to_one_waiter(l1: TieredCache, joined: Joined, gate: Gate) -> None:
    """Cancelling the task that leads a load abandons the flight: exactly one of the waiters
    takes the load over (one more call, not one per waiter) and every waiter gets its value."""
    loader = Loader(ASYNC, Pause("never", until=gate), "taken over")
    f = tiered(l1)(loader.fn())

    async def scenario() -> None:
        leader = asyncio.ensure_future(f(1))
        await aeventually(lambda: loader.calls == 1, "the leader to call the function")
        waiters = [asyncio.ensure_future(f(1)) for _ in range(N)]
        await joined.ablock(N)
        leader.cancel()
        assert await asyncio.wait_for(asyncio.gather(*waiters), WAIT) == ["taken over"] * N
        with pytest.raises(asyncio.CancelledError):
            await leader
        assert loader.cancelled.is_set()

    asyncio.run(scenario())
    assert loader.calls == 2
    assert l1.stats().in_flight == 0
    assert l1._core.local.get(f.key(1)) == "taken over"


def test_cancelled_caller_of_detached_load_leaves_it_running(l1: TieredCache, joined: Joined, gate: Gate) -> None:
    """With a timeout the load is a task of its own: cancelling the caller that started it does
    not cancel the load, and the other callers get its value from the one call."""
    loader = Loader(ASYNC, Pause("value", until=gate))
    f = tiered(l1, hard_timeout=WAIT)(loader.fn())

    async def scenario() -> None:
        first = asyncio.ensure_future(f(1))
        second = asyncio.ensure_future(f(1))
        await joined.ablock(2)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.open()
        assert await asyncio.wait_for(second, WAIT) == "value"

    asyncio.run(scenario())
    assert loader.calls == 1
    assert not loader.cancelled.is_set()
    assert l1.stats().in_flight == 0


# -- hard and soft timeouts -------------------------------------------------------------------


def test_hard_timeout_without_stale_raises_load_timeout(mode: Any, l1: TieredCache, gate: Gate) -> None:
    """A load that hangs releases every caller at ``hard_timeout`` with LoadTimeoutError; an
    async load is cancelled; the next call starts a new load."""
    loader = Loader(mode, Pause("late", until=gate))
    f = tiered(l1, hard_timeout=HARD)(loader.fn())
    results, elapsed = crowd(mode, N, lambda: f(1))
    assert all(isinstance(r, LoadTimeoutError) for r in results), results
    assert "hard_timeout=0.2" in str(results[0])
    assert HARD <= elapsed < HARD + SLACK
    # Sync: one load. Async: a waiter whose deadline had not quite come when another's timeout
    # cancelled the load may start another (see test_hard_timeout_bounds_every_callers_wait).
    assert loader.calls == 1 or (mode.is_async and loader.calls >= 1)
    stats = l1.stats()
    assert stats.load_timeouts == N
    assert stats.in_flight == 0
    assert stats.stale_served == 0
    if mode.is_async:
        eventually(loader.cancelled.is_set, "the hanging async load to be cancelled", mode=mode)
    hung = loader.calls
    loader.outcomes = ["fresh"]  # from now on the function answers at once
    assert mode.call(f, 1) == "fresh"  # a new load, not the hanging one
    assert loader.calls == hung + 1


def test_hard_timeout_bounds_every_callers_wait(l1: TieredCache, gate: Gate) -> None:
    """``hard_timeout`` bounds each caller's wait from its own call. Caller B joins caller A's
    hanging async load 0.05 s after A; at A's deadline A's timeout cancels the load, which
    ends the flight as abandoned; B must still be answered at its own deadline (0.3 s after
    its call), not start its wait over with a new load (which makes it 0.55 s)."""
    hard = 0.3
    loader = Loader(ASYNC, Pause("late", until=gate))
    f = tiered(l1, hard_timeout=hard)(loader.fn())

    async def timed() -> tuple[Any, float]:
        started = time.monotonic()
        try:
            return await f(1), time.monotonic() - started
        except LoadTimeoutError as exc:
            return exc, time.monotonic() - started

    async def scenario() -> list[tuple[Any, float]]:
        a = asyncio.ensure_future(timed())
        await aeventually(lambda: loader.calls == 1, "the load to start")
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(timed())
        return await asyncio.wait_for(asyncio.gather(a, b), WAIT)

    (a_result, a_waited), (b_result, b_waited) = asyncio.run(scenario())
    assert isinstance(a_result, LoadTimeoutError)
    assert isinstance(b_result, LoadTimeoutError)
    assert a_waited < hard + 0.1
    assert b_waited < hard + 0.1, f"B waited {b_waited:.2f} s with hard_timeout={hard} ({loader.calls} loads started)"


def test_soft_timeout_alone_waits_without_bound(mode: Any, l1: TieredCache) -> None:
    """``soft_timeout`` without ``hard_timeout`` and without a stale value: callers wait for
    the load, however long it takes."""
    loader = Loader(mode, Pause("slow value", seconds=4 * SOFT))
    f = tiered(l1, soft_timeout=SOFT)(loader.fn())
    assert mode.call(f, 1) == "slow value"
    assert l1.stats().load_timeouts == 0


# -- stale values -------------------------------------------------------------------------------


def test_stale_value_not_served_while_function_succeeds(mode: Any, l1: TieredCache, clock: Clock) -> None:
    loader = Loader(mode, "v1", "v2")
    f = tiered(l1, ttl=10, stale_ttl=100)(loader.fn())
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    assert mode.call(f, 1) == "v2"
    assert l1.stats().stale_served == 0


def test_stale_served_counts_every_caller(mode: Any, l1: TieredCache, clock: Clock, joined: Joined) -> None:
    """``stats().stale_served`` counts the calls answered with a stale value: N concurrent
    callers of a failing function, all answered with the stale value, count N (as they do when
    released by a timeout)."""
    loader = Loader(mode, "v1", Pause(Boom("down"), until=joined.reach(N - 1)))
    f = tiered(l1, ttl=10, stale_ttl=100)(loader.fn())
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    results, _ = crowd(mode, N, lambda: f(1))
    assert results == ["v1"] * N
    assert loader.calls == 2
    assert l1.stats().stale_served == N


# -- refresh ahead of expiry --------------------------------------------------------------------


def test_refresh_after_expired_entry_is_an_ordinary_miss(mode: Any, l1: TieredCache, clock: Clock) -> None:
    loader = Loader(mode, "v1", "v2")
    f = tiered(l1, ttl=10, refresh_after=5)(loader.fn())
    assert mode.call(f, 1) == "v1"
    clock.advance(11)
    assert mode.call(f, 1) == "v2"  # not the expired value
    assert l1.stats().refreshes_ahead == 0


class Draw:
    """Stands in for ``RNG`` in tiercache._policy: XFetch's ``-ln(U)`` is then exactly 1."""

    @staticmethod
    def random() -> float:
        return 1.0 - math.exp(-1.0)


def test_xfetch_refreshes_about_beta_load_times_before_expiry(
    mode: Any, l1: TieredCache, clock: Clock, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XFetch: an entry whose function took ``delta`` seconds becomes due ``delta * beta *
    -ln(U)`` before it expires (here -ln(U) = 1, delta = 2 s on the injected clock, beta = 3:
    6 s early); then a call answers the current value and starts one background refresh."""
    monkeypatch.setattr(tiercache._policy, "RNG", Draw)
    first = threading.Event()

    def took_two_seconds(value: Any) -> Any:
        if not first.is_set():
            first.set()
            clock.advance(2.0)  # the load's duration as the cache measures it
        return value

    loader = Loader(mode, "v1", Pause("v2", until=gate))
    body = loader.fn()
    if mode.is_async:

        async def timed(x: int) -> Any:
            return took_two_seconds(await body(x))

    else:

        def timed(x: int) -> Any:
            return took_two_seconds(body(x))

    f = tiered(l1, ttl=100, refresh_beta=3.0)(timed)
    assert mode.call(f, 1) == "v1"
    assert l1._core.local.ttl_left(f.key(1)) == pytest.approx(94, abs=0.5)  # fresh until 6 s early
    clock.advance(93)
    assert mode.call(f, 1) == "v1"
    assert l1.stats().refreshes_ahead == 0
    clock.advance(2)  # 5 s before expiry: due
    assert mode.call(f, 1) == "v1"
    assert mode.call(f, 1) == "v1"
    assert l1.stats().refreshes_ahead == 1
    eventually(lambda: loader.calls == 2, "the background refresh to call the function", mode=mode)
    gate.open()
    eventually(lambda: l1._core.local.get(f.key(1)) == "v2", "the refresh to land", mode=mode)
    assert mode.call(f, 1) == "v2"
    assert loader.calls == 2


def test_xfetch_without_measured_load_time_refreshes_only_at_expiry(
    mode: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that never called the function (its copy came from Redis) has no ``delta``,
    so its copy is not refreshed ahead; the process that loaded it (delta = 0.01 s, beta = 1000:
    10 s early) refreshes it."""
    monkeypatch.setattr(tiercache._policy, "RNG", Draw)
    server = fakeredis.FakeServer()
    caches = [
        TieredCache(
            client=fakeredis.FakeRedis(server=server),
            async_client=fakeredis.FakeAsyncRedis(server=server),
            namespace="xfetch",
            clock=clock,
            coherent=False,
            l1_ttl=1000,
        )
        for _ in range(2)
    ]
    loaded = threading.Event()

    def slow_once(x: int) -> str:
        if not loaded.is_set():
            loaded.set()
            clock.advance(0.01)
        return "v"

    body = slow_once
    if mode.is_async:

        async def body(x: int) -> str:  # type: ignore[misc]
            return slow_once(x)

    try:
        writer, reader = (tiered(c, ttl=100, refresh_beta=1000.0, name="f")(body) for c in caches)
        assert mode.call(writer, 1) == "v"
        assert mode.call(reader, 1) == "v"  # an L2 hit
        assert caches[1].stats().l2_hits == 1
        clock.advance(95)  # 5 s before expiry
        assert mode.call(reader, 1) == "v"
        assert caches[1].stats().refreshes_ahead == 0
        assert mode.call(writer, 1) == "v"
        assert caches[0].stats().refreshes_ahead == 1
        eventually(lambda: not caches[0]._core.refreshing, "the writer's refresh to end", mode=mode)
    finally:
        for c in caches:
            if mode.is_async:
                mode.run(c.aclose())
            else:
                c.close()


# -- TTL jitter ---------------------------------------------------------------------------------


def test_ttl_jitter_spreads_l1_expiry_within_bounds(mode: Any, l1: TieredCache) -> None:
    """L1 copies follow their (jittered) Redis TTL: each fill's TTL lies in [ttl*(1-j), ttl],
    and fills differ."""
    f = tiered(l1, ttl=100, ttl_jitter=0.3)(Loader(mode, "v").fn())
    lefts = []
    for i in range(50):
        mode.call(f, i)
        left = l1._core.local.ttl_left(f.key(i))
        assert left is not None
        lefts.append(left)
    assert all(70 - 0.5 <= left <= 100 for left in lefts), lefts
    assert len({round(left, 2) for left in lefts}) > 25, lefts
    assert max(lefts) - min(lefts) > 10


def test_no_jitter_is_the_exact_ttl(mode: Any, l1: TieredCache) -> None:
    f = tiered(l1, ttl=100)(Loader(mode, "v").fn())
    for i in range(10):
        mode.call(f, i)
        assert l1._core.local.ttl_left(f.key(i)) == pytest.approx(100, abs=0.5)


# -- negative caching ---------------------------------------------------------------------------


def test_cache_errors_caches_listed_exceptions_for_error_ttl(mode: Any, l1: TieredCache, clock: Clock) -> None:
    """A listed exception type (or a subclass) is raised again from L1 for ``error_ttl`` without
    calling the function; other exceptions are not cached; an invalidation drops it."""
    missing = KeyError("no such user")
    loader = Loader(mode, missing)
    f = tiered(l1, cache_errors=(LookupError,), error_ttl=30)(loader.fn())
    for _ in range(3):
        with pytest.raises(KeyError) as info:
            mode.call(f, 1)
        assert info.value is missing
    assert loader.calls == 1
    assert l1.stats().errors_cached == 1
    assert l1.stats().in_flight == 0
    clock.advance(29)
    with pytest.raises(KeyError):
        mode.call(f, 1)
    assert loader.calls == 1
    clock.advance(2)  # past error_ttl
    with pytest.raises(KeyError):
        mode.call(f, 1)
    assert loader.calls == 2
    assert l1.stats().errors_cached == 2
    mode.call(f.invalidate, 1)
    with pytest.raises(KeyError):
        mode.call(f, 1)
    assert loader.calls == 3


# -- the circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_skips_redis_and_closes_after_probe(mode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``breaker_threshold`` consecutive Redis failures open the breaker: calls then send
    nothing to Redis and are answered by the function; after ``breaker_cooldown`` one call
    probes (a failed probe reopens it), and a successful probe closes it."""
    sent: list[str] = []
    sync_execute, async_execute = SyncRedis.execute, AsyncRedis.execute

    def counting_execute(self: SyncRedis, op: Any) -> Any:
        sent.append(str(op.args[0]))
        return sync_execute(self, op)

    async def counting_aexecute(self: AsyncRedis, op: Any) -> Any:
        sent.append(str(op.args[0]))
        return await async_execute(self, op)

    monkeypatch.setattr(SyncRedis, "execute", counting_execute)
    monkeypatch.setattr(AsyncRedis, "execute", counting_aexecute)
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeRedis(server=server)
    clock = Clock(500.0, frozen=True)
    cache = TieredCache(
        client=fakeredis.FakeRedis(server=server),
        async_client=fakeredis.FakeAsyncRedis(server=server),
        namespace="breaker",
        coherent=False,
        breaker_threshold=3,
        breaker_cooldown=2.0,
        clock=clock,
    )
    try:
        loader = Loader(mode, "answer")
        f = tiered(cache)(loader.fn())
        assert mode.call(f, 0) == "answer"
        assert raw.get(f.key(0)) is not None
        server.connected = False
        for i in range(1, 4):  # three failed reads in a row
            assert mode.call(f, i) == "answer"
        assert cache._core.breaker.is_open
        assert cache.stats().backend_errors == 3
        before = len(sent)
        for i in range(4, 14):
            assert mode.call(f, i) == "answer"
        assert len(sent) == before  # open: nothing sent to Redis
        assert cache.stats().backend_errors == 3
        assert loader.calls == 14
        clock.advance(2.0)  # the cooldown passed: one probe, which fails
        assert mode.call(f, 14) == "answer"
        assert len(sent) == before + 1
        assert cache.stats().backend_errors == 4
        assert mode.call(f, 15) == "answer"
        assert len(sent) == before + 1  # reopened
        server.connected = True
        assert mode.call(f, 16) == "answer"
        assert raw.get(f.key(16)) is None  # still open until the next cooldown ends
        clock.advance(2.0)
        assert mode.call(f, 17) == "answer"  # the probe succeeds ...
        assert not cache._core.breaker.is_open
        assert mode.call(f, 18) == "answer"  # ... and Redis is used again
        assert raw.get(f.key(17)) is not None
        assert raw.get(f.key(18)) is not None
        assert cache.stats().backend_errors == 4
    finally:
        if mode.is_async:
            mode.run(cache.aclose())
        else:
            cache.close()


# -- configuration ------------------------------------------------------------------------------


def _f(x: int) -> int:
    return x


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"stale_ttl": -1}, "stale_ttl"),
        ({"stale_ttl": float("nan")}, "stale_ttl"),
        ({"stale_ttl": "60"}, "stale_ttl"),
        ({"soft_timeout": 0}, "soft_timeout"),
        ({"soft_timeout": -0.5}, "soft_timeout"),
        ({"hard_timeout": 0}, "hard_timeout"),
        ({"hard_timeout": float("inf")}, "hard_timeout"),
        ({"soft_timeout": 1.0, "hard_timeout": 1.0}, "soft_timeout"),
        ({"soft_timeout": 2.0, "hard_timeout": 1.0}, "soft_timeout"),
        ({"ttl_jitter": 1.5}, "ttl_jitter"),
        ({"ttl_jitter": 1.0}, "ttl_jitter"),
        ({"ttl_jitter": -0.1}, "ttl_jitter"),
        ({"ttl_jitter": float("nan")}, "ttl_jitter"),
        ({"ttl_jitter": "0.1"}, "ttl_jitter"),
        ({"cache_errors": [KeyError]}, "cache_errors"),
        ({"cache_errors": KeyError}, "cache_errors"),
        ({"cache_errors": (KeyError, "ValueError")}, "cache_errors"),
        ({"cache_errors": (int,)}, "cache_errors"),
        ({"cache_errors": (KeyError("x"),)}, "cache_errors"),
        ({"refresh_beta": -1.0}, "refresh_beta"),
        ({"refresh_after": 0}, "refresh_after"),
        ({"refresh_after": -1}, "refresh_after"),
        ({"ttl": 10, "refresh_after": 10}, "refresh_after"),
        ({"ttl": 10, "refresh_after": 11}, "refresh_after"),
        ({"refresh_after": 300}, "refresh_after"),  # the cache's ttl (300) applies
        ({"error_ttl": 0}, "error_ttl"),
    ],
)
def test_bad_tiered_arguments_are_config_errors(kwargs: dict[str, Any], name: str) -> None:
    """Checked when the decorator is made or applied; the message names the argument."""
    cache = TieredCache(namespace="config", ttl=300)
    with pytest.raises(ConfigError, match=rf"\b{name}="):
        tiered(cache, **kwargs)(_f)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"lease_ttl": -1}, "lease_ttl"),
        ({"lease_ttl": float("nan")}, "lease_ttl"),
        ({"breaker_threshold": 0}, "breaker_threshold"),
        ({"breaker_threshold": -1}, "breaker_threshold"),
        ({"breaker_threshold": 2.5}, "breaker_threshold"),
        ({"breaker_threshold": "5"}, "breaker_threshold"),
        ({"breaker_cooldown": 0}, "breaker_cooldown"),
        ({"breaker_cooldown": -1.0}, "breaker_cooldown"),
    ],
)
def test_bad_cache_arguments_are_config_errors(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{name}="):
        TieredCache(namespace="config", **kwargs)


def test_good_stampede_arguments_are_accepted() -> None:
    cache = TieredCache(namespace="config", ttl=10, lease_ttl=0.5, breaker_threshold=1, breaker_cooldown=0.1)
    f = tiered(
        cache,
        stale_ttl=0,
        soft_timeout=0.1,
        hard_timeout=0.2,
        refresh_beta=0,
        refresh_after=9.9,
        ttl_jitter=0.0,
        cache_errors=(KeyError, OSError),
        error_ttl=0.5,
    )(_f)
    assert f(3) == 3
