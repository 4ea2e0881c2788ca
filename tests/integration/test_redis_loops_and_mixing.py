"""One cache across successive event loops, and one cache serving sync and async code at once."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from typing import Any

import pytest

from tiercache import TieredCache, tiered

from integration_helpers import other_clients, wait_until

pytestmark = pytest.mark.redis


def test_async_calls_work_across_successive_event_loops(redis_server: Any, raw: Any, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace)
    calls: list[int] = []

    @tiered(cache, name="double")
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        calls.append(x)
        return 2 * x

    async def first() -> list[int]:
        try:
            return [await double(1), await double(2)]
        finally:
            await cache.aclose()

    async def second() -> list[Any]:
        try:
            planted = cache.key("planted")
            raw.set(planted, cache._core.codec.encode(planted, "from redis"))
            return [await double(3), await double(1), await cache.aio.get("planted")]
        finally:
            await cache.aclose()

    try:
        assert asyncio.run(first()) == [2, 4]
        assert raw.exists(double.key(1), double.key(2)) == 2
        assert asyncio.run(second()) == [6, 2, "from redis"]
        assert raw.exists(double.key(3)) == 1, "the miss in the second event loop did not reach Redis"
        assert calls == [1, 2, 3]
        stats = cache.stats()
        assert stats.backend_errors == 0, "Redis failed in the second event loop"
        assert stats.l2_hits == 1
    finally:
        cache.close()


def test_async_calls_work_across_event_loops_without_aclose(redis_server: Any, raw: Any, namespace: str) -> None:
    """The loop a pool was made on is gone: the next asyncio.run must not reuse that pool."""
    cache = TieredCache(redis_server.url, namespace=namespace)
    f = tiered(cache, name="neg")(_async_neg)
    results = []
    try:
        with warnings.catch_warnings():  # connections of finished loops: see the leak test below
            warnings.simplefilter("ignore", ResourceWarning)
            for i in range(3):
                results.append(asyncio.run(f(i)))
            assert results == [0, -1, -2]
            assert raw.exists(*(f.key(i) for i in range(3))) == 3
            assert cache.stats().backend_errors == 0
    finally:
        _forget(cache)


async def _async_neg(x: int) -> int:
    return -x


def _forget(cache: TieredCache) -> None:
    """Drop the pools of finished loops and collect them now, with their warnings silenced,
    so the sockets they leak do not turn into warnings in later tests."""
    cache.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pools = getattr(cache._async, "_pools", None)
        if pools is not None:
            pools.clear()
        gc.collect()


@pytest.mark.slow
def test_finished_event_loops_release_their_connections(own_redis: Any, own_raw: Any, namespace: str) -> None:
    """The async driver keeps a pool per event loop, "weakly, so a finished asyncio.run takes
    its pool with it": five asyncio.run() calls must not leave five connections open."""
    cache = TieredCache(own_redis.url, namespace=namespace)
    f = tiered(cache, name="neg")(_async_neg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for i in range(5):
                assert asyncio.run(f(i)) == -i
            gc.collect()
            time.sleep(0.05)
            open_conns = len(other_clients(own_raw))
            pools = len(getattr(cache._async, "_pools", {}))
        assert open_conns <= 1, (
            f"{open_conns} connections still open after 5 finished event loops "
            f"({pools} pools still referenced): pools of finished loops leak"
        )
    finally:
        _forget(cache)


def test_sync_and_async_functions_share_one_l1(redis_server: Any, raw: Any, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace)
    calls: list[tuple[str, int]] = []

    @tiered(cache, name="shared")
    def load(x: int) -> list[int]:
        calls.append(("sync", x))
        return [x, x]

    @tiered(cache, name="shared")
    async def aload(x: int) -> list[int]:
        calls.append(("async", x))
        return [x, x]

    async def scenario() -> None:
        # Computed by the sync function, answered to the async one from L1 (no Redis round trip).
        assert load(1) == [1, 1]
        l2_before = cache.stats().l2_hits
        assert await aload(1) == [1, 1]
        assert cache.stats().l2_hits == l2_before
        # And the other way round.
        assert await aload(2) == [2, 2]
        assert load(2) == [2, 2]
        # The user-key API of both views shares L1 too.
        cache.set("k", {"sync": True})
        raw.delete(cache.key("k"))  # only L1 has it now
        assert await cache.aio.get("k") == {"sync": True}
        await cache.aio.set("j", {"async": True})
        raw.delete(cache.key("j"))
        assert cache.get("j") == {"async": True}
        # An invalidation through either view evicts what the other one stored.
        await aload.invalidate(1)
        assert load(1) == [1, 1]
        await cache.aclose()

    try:
        assert load.key(1) == aload.key(1)
        asyncio.run(scenario())
        assert calls == [("sync", 1), ("async", 2), ("sync", 1)]
        assert cache.stats().l1_hits >= 4
        assert cache.stats().backend_errors == 0
    finally:
        cache.close()


def test_sync_and_async_callers_single_flight_one_load(redis_server: Any, raw: Any, namespace: str) -> None:
    """A thread loading a key and coroutines asking for it meanwhile: one load, everyone answered."""
    cache = TieredCache(redis_server.url, namespace=namespace)
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    @tiered(cache, name="slow")
    def slow(x: int) -> str:
        calls.append("sync")
        started.set()
        release.wait(10)
        return f"value{x}"

    @tiered(cache, name="slow")
    async def aslow(x: int) -> str:
        calls.append("async")
        return "async computed"

    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(slow(7)))

    async def waiters() -> list[str]:
        try:
            tasks = [asyncio.ensure_future(aslow(7)) for _ in range(5)]
            await asyncio.sleep(0.05)
            assert not any(t.done() for t in tasks), "async callers did not wait for the sync load"
            release.set()
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 10))
        finally:
            await cache.aclose()

    try:
        thread.start()
        assert started.wait(10)
        assert asyncio.run(waiters()) == ["value7"] * 5
        thread.join(10)
        assert results == ["value7"]
        assert calls == ["sync"]
        assert wait_until(lambda: raw.exists(slow.key(7)), 5, what="the value in Redis")
    finally:
        release.set()
        thread.join(10)
        cache.close()
