"""One cache across successive event loops, and one cache serving sync and async code at once."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from typing import Any

import pytest

from tests.support import eventually, named_clients, named_url, ready
from tiercache import TieredCache, tiered

pytestmark = pytest.mark.redis


def test_async_calls_work_across_successive_event_loops(redis_server: Any, raw: Any, namespace: str) -> None:
    """The same cache in two asyncio.run() calls, as a CLI or a test suite would use it: the
    second loop must not reuse the first loop's connections, and both reach Redis."""
    cache = ready(TieredCache(redis_server.url, namespace=namespace))
    calls: list[int] = []

    @tiered(cache, name="double")
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        calls.append(x)
        return 2 * x

    async def first() -> list[int]:
        return [await double(1), await double(2)]

    async def second() -> list[Any]:
        planted = cache.key("planted")
        raw.set(planted, cache._core.codec.encode(planted, "from redis"))
        return [await double(3), await double(1), await cache.aio.get("planted")]

    async def third() -> list[Any]:
        try:
            return [await double(4), await double(3)]
        finally:
            await cache.aclose()

    try:
        assert asyncio.run(first()) == [2, 4]
        assert raw.exists(double.key(1), double.key(2)) == 2
        assert asyncio.run(second()) == [6, 2, "from redis"]
        assert raw.exists(double.key(3)) == 1, "the miss in the second event loop did not reach Redis"
        assert asyncio.run(third()) == [8, 6]
        assert raw.exists(double.key(4)) == 1, "the miss in the third event loop did not reach Redis"
        assert calls == [1, 2, 3, 4]
        stats = cache.stats()
        assert stats.backend_errors == 0, "Redis failed in a later event loop"
        assert stats.l2_hits == 1  # only the planted value: the rest came from this process's L1
    finally:
        cache.close()
    gc.collect()  # sockets of finished loops left open would warn (and fail) here, in this test


async def _async_neg(x: int) -> int:
    return -x


@pytest.mark.slow
def test_finished_event_loops_release_their_connections(own_redis: Any, own_raw: Any, namespace: str) -> None:
    """A pool per event loop: five asyncio.run() calls must not leave five pools' connections
    open, and close() must leave none at all."""
    cache = ready(TieredCache(named_url(own_redis.url, "tc-loops"), namespace=namespace))
    f = tiered(cache, name="neg")(_async_neg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # asserted on below, by counting
            assert asyncio.run(f(0)) == 0
            after_one = named_clients(own_raw, "tc-loops", subscribers=False)
            for i in range(1, 6):
                assert asyncio.run(f(i)) == -i
            gc.collect()
            time.sleep(0.05)
            after_six = named_clients(own_raw, "tc-loops", subscribers=False)
        assert after_six <= after_one, (
            f"{after_six} connections open after 6 finished event loops, {after_one} after one: "
            "pools of finished loops leak"
        )
    finally:
        cache.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    eventually(lambda: named_clients(own_raw, "tc-loops") == 0, "no connection left after close()", timeout=5)


def test_sync_and_async_functions_share_one_l1(redis_server: Any, raw: Any, namespace: str) -> None:
    cache = ready(TieredCache(redis_server.url, namespace=namespace))
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
    cache = ready(TieredCache(redis_server.url, namespace=namespace))
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
        assert eventually(lambda: raw.exists(slow.key(7)), "the value in Redis", timeout=5)
    finally:
        release.set()
        thread.join(10)
        cache.close()
