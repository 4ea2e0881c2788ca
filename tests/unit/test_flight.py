"""Single-flight of loads (threads and tasks), failing loads, and invalidations during a load."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fakeredis
import pytest

from tests.support import WAIT, Clock, Joined, aeventually, eventually
from tiercache import MISSING, TieredCache, _read, tiered
from tiercache._flight import FlightTable

N = 8


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def cache(server: fakeredis.FakeServer) -> Iterator[TieredCache]:
    cache = TieredCache(
        client=fakeredis.FakeRedis(server=server),
        async_client=fakeredis.FakeAsyncRedis(server=server),
        namespace="flight",
        clock=Clock(1000.0, frozen=True),
    )
    assert cache.ready()  # L1 takes entries once the invalidation subscriber is subscribed
    yield cache
    cache.close()


@pytest.fixture
def raw(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


def test_flight_table_lead_join_release() -> None:
    table: FlightTable = TieredCache(namespace="flight")._core.flights
    first, lead = table.lead_or_join("k")
    assert lead
    second, lead2 = table.lead_or_join("k")
    assert second is first and not lead2
    other, lead3 = table.lead_or_join("j")
    assert lead3 and other is not first
    assert len(table) == 2
    seen: list[str] = []
    assert first.add_waiter(lambda: seen.append("woke"))
    first.finish(42)
    assert seen == ["woke"]
    assert not first.add_waiter(lambda: seen.append("late"))  # already over: no call
    assert seen == ["woke"]
    table.release(first)
    table.release(first)  # twice is harmless
    assert len(table) == 1
    _, lead4 = table.lead_or_join("k")
    assert lead4


# -- single flight ----------------------------------------------------------------------------


def test_single_flight_threads(cache: TieredCache, raw: fakeredis.FakeRedis, joined: Joined) -> None:
    entered = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    @tiered(cache)
    def slow(x: int) -> list[int]:
        calls.append(x)
        entered.set()
        assert release.wait(WAIT)
        return [x, len(calls)]

    with ThreadPoolExecutor(N) as pool:
        futures = [pool.submit(slow, 1) for _ in range(N)]
        assert entered.wait(WAIT)
        eventually(lambda: joined.count == N - 1, "all threads to join the flight")
        assert calls == [1]
        release.set()
        results = [f.result(WAIT) for f in futures]
    assert results == [[1, 1]] * N
    assert calls == [1]
    stats = cache.stats()
    assert stats.loads == 1
    assert stats.misses == 1
    assert stats.in_flight == 0
    assert raw.get(slow.key(1)) is not None
    assert slow(1) == [1, 1]


def test_single_flight_asyncio_tasks(cache: TieredCache, joined: Joined) -> None:
    calls: list[int] = []

    async def scenario() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        @tiered(cache)
        async def slow(x: int) -> list[int]:
            calls.append(x)
            entered.set()
            await release.wait()
            return [x, len(calls)]

        tasks = [asyncio.ensure_future(slow(7)) for _ in range(N)]
        await aeventually(lambda: entered.is_set() and joined.count == N - 1, "all tasks to join")
        assert calls == [7]
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert results == [[7, 1]] * N
        assert await slow(7) == [7, 1]
        await cache.aclose()

    asyncio.run(scenario())
    assert calls == [7]
    assert cache.stats().loads == 1
    assert cache.stats().in_flight == 0


def test_different_keys_load_concurrently(cache: TieredCache) -> None:
    barrier = threading.Barrier(3, timeout=WAIT)

    @tiered(cache)
    def f(x: int) -> int:
        barrier.wait()  # only passes if three different keys load at the same time
        return x

    with ThreadPoolExecutor(3) as pool:
        assert sorted(pool.map(f, [1, 2, 3])) == [1, 2, 3]


# -- failing loads ----------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_failing_load_threads(cache: TieredCache, raw: fakeredis.FakeRedis, joined: Joined) -> None:
    entered = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    @tiered(cache)
    def fails(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            entered.set()
            assert release.wait(WAIT)
            raise Boom(f"boom {x}")
        return x * 10

    with ThreadPoolExecutor(N) as pool:
        futures = [pool.submit(fails, 3) for _ in range(N)]
        assert entered.wait(WAIT)
        eventually(lambda: joined.count == N - 1, "all threads to join the flight")
        release.set()
        errors = [f.exception(WAIT) for f in futures]
    assert all(isinstance(e, Boom) and str(e) == "boom 3" for e in errors), errors
    assert calls == [3]
    stats = cache.stats()
    assert stats.in_flight == 0
    assert stats.l1_size == 0
    assert stats.loads == 1
    assert stats.load_errors == 1
    assert cache._core.local.get(fails.key(3)) is MISSING
    assert raw.get(fails.key(3)) is None
    assert fails(3) == 30  # nothing cached: the next call loads again
    assert calls == [3, 3]


def test_failing_load_asyncio_tasks(cache: TieredCache, raw: fakeredis.FakeRedis, joined: Joined) -> None:
    calls: list[int] = []

    async def scenario() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        @tiered(cache)
        async def fails(x: int) -> int:
            calls.append(x)
            if len(calls) == 1:
                entered.set()
                await release.wait()
                raise Boom("async boom")
            return -x

        tasks = [asyncio.ensure_future(fails(4)) for _ in range(N)]
        await aeventually(lambda: entered.is_set() and joined.count == N - 1, "all tasks to join")
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert all(isinstance(r, Boom) and str(r) == "async boom" for r in results), results
        assert cache.stats().in_flight == 0
        assert cache._core.local.get(fails.key(4)) is MISSING
        assert raw.get(fails.key(4)) is None
        assert await fails(4) == -4
        await cache.aclose()

    asyncio.run(scenario())
    assert calls == [4, 4]
    assert cache.stats().load_errors == 1


def test_cancelled_async_leader_hands_over(cache: TieredCache, joined: Joined) -> None:
    calls: list[int] = []

    async def scenario() -> None:
        entered = asyncio.Event()

        @tiered(cache)
        async def slow(x: int) -> int:
            calls.append(x)
            if len(calls) == 1:
                entered.set()
                await asyncio.sleep(3600)
            return x + 100

        leader = asyncio.ensure_future(slow(1))
        await entered.wait()
        follower = asyncio.ensure_future(slow(1))
        await aeventually(lambda: joined.count == 1, "the follower to join")
        leader.cancel()
        assert await asyncio.wait_for(follower, WAIT) == 101
        with pytest.raises(asyncio.CancelledError):
            await leader
        await cache.aclose()

    asyncio.run(scenario())
    assert calls == [1, 1]
    assert cache.stats().in_flight == 0


# -- invalidation while a load is in flight ---------------------------------------------------


def make_blocking(cache: TieredCache) -> tuple[Any, threading.Event, threading.Event, list[str]]:
    entered = threading.Event()
    release = threading.Event()
    results: list[str] = []

    @tiered(cache, key=lambda x: f"item:{x}")
    def item(x: int) -> str:
        results.append("x")
        if len(results) == 1:
            entered.set()
            assert release.wait(WAIT)
            return "stale"
        return f"fresh{len(results)}"

    return item, entered, release, results


def invalidate(cache: TieredCache, f: Any, how: str) -> None:
    if how == "invalidate":
        f.invalidate(1)
    else:
        cache.delete("item:1")


@pytest.mark.parametrize("how", ["invalidate", "delete"])
def test_invalidation_during_load_keeps_result_out_of_l1(cache: TieredCache, how: str) -> None:
    item, entered, release, _ = make_blocking(cache)
    key = item.key(1)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(item, 1)
        assert entered.wait(WAIT)
        invalidate(cache, item, how)
        release.set()
        assert loading.result(WAIT) == "stale"  # the caller still gets its answer
    assert cache._core.local.get(key) is MISSING
    assert cache._core.local.ttl_left(key) is None
    assert cache.stats().l1_size == 0
    assert cache.stats().in_flight == 0


@pytest.mark.parametrize("how", ["invalidate", "delete"])
def test_caller_after_invalidation_does_not_join_old_flight(cache: TieredCache, joined: Joined, how: str) -> None:
    item, entered, release, calls = make_blocking(cache)
    key = item.key(1)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(item, 1)
        assert entered.wait(WAIT)
        invalidate(cache, item, how)
        assert item(1) == "fresh2"  # a new load, not the old flight's answer
        assert joined.count == 0
        assert len(calls) == 2
        release.set()
        assert loading.result(WAIT) == "stale"
    assert cache._core.local.get(key) == "fresh2"
    assert item(1) == "fresh2"
    assert len(calls) == 2
    assert cache.stats().in_flight == 0


@pytest.mark.parametrize("how", ["invalidate", "delete"])
def test_load_overtaken_by_invalidation_does_not_reach_redis(
    cache: TieredCache, server: fakeredis.FakeServer, raw: fakeredis.FakeRedis, how: str
) -> None:
    """The stale result must not outlive the invalidation in L2 either: another process that
    reads the key after the invalidation must not be served what was loaded before it."""
    item, entered, release, _ = make_blocking(cache)
    key = item.key(1)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(item, 1)
        assert entered.wait(WAIT)
        invalidate(cache, item, how)
        release.set()
        assert loading.result(WAIT) == "stale"
    with TieredCache(client=fakeredis.FakeRedis(server=server), namespace="flight", coherent=False) as other:
        assert other.get("item:1", "absent") != "stale"
    stored = raw.get(key)
    assert stored is None or cache._core.codec.decode(key, stored) != "stale"


@pytest.mark.parametrize("how", ["invalidate", "delete"])
def test_invalidation_during_async_load(cache: TieredCache, joined: Joined, how: str) -> None:
    calls: list[str] = []

    async def scenario() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        @tiered(cache, key=lambda x: f"item:{x}")
        async def item(x: int) -> str:
            calls.append("x")
            if len(calls) == 1:
                entered.set()
                await release.wait()
                return "stale"
            return "fresh"

        key = item.key(1)
        loading = asyncio.ensure_future(item(1))
        await entered.wait()
        if how == "invalidate":
            await item.invalidate(1)
        else:
            await cache.aio.delete("item:1")
        release.set()
        assert await asyncio.wait_for(loading, WAIT) == "stale"
        assert cache._core.local.get(key) is MISSING
        assert cache.stats().l1_size == 0
        assert joined.count == 0
        await cache.aclose()

    asyncio.run(scenario())
    assert cache.stats().in_flight == 0


# -- the read flow, driven by hand ------------------------------------------------------------


@pytest.mark.parametrize("pttl_ms", [0, 1, 250, 1500, 59_999])
def test_l1_copy_never_outlives_redis_copy(cache: TieredCache, pttl_ms: int) -> None:
    """Whatever PTTL Redis answers (0 included: the key's last millisecond), L1 keeps the value
    no longer than that."""
    key = cache.key("edge")
    data = cache._core.codec.encode(key, "v")
    flow = _read.read_through(cache._core, key, cache._core.default_policy, False)
    op = next(flow)  # the read of the key; answer it as Redis would
    assert key in op.args
    with pytest.raises(StopIteration) as stop:
        flow.send((data, pttl_ms))
    assert stop.value.value == "v"
    left = cache._core.local.ttl_left(key)
    assert left is None or left <= pttl_ms / 1000.0 + 1e-9


def test_l1_ttl_when_redis_key_has_no_expiry(cache: TieredCache) -> None:
    key = cache.key("forever")
    data = cache._core.codec.encode(key, "v")
    flow = _read.read_through(cache._core, key, cache._core.default_policy, False)
    next(flow)
    with pytest.raises(StopIteration):
        flow.send((data, -1))
    left = cache._core.local.ttl_left(key)
    assert left is not None
    assert 0 < left <= 60.0
