"""Coalesced async reads (``coalesce_reads``): one pipeline per event-loop iteration, each task
its own answer; failures and cancellation of the task that sends the batch fail no one else."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from tiercache import TieredCache, tiered

pytestmark = pytest.mark.redis


def counting(cache: TieredCache) -> list[int]:
    """Count connections taken from the running loop's pool (one per round trip)."""
    assert cache._async is not None
    pool = cache._async._pool()[0]
    taken = [0]
    get = pool.get_connection

    async def counted(*a: Any, **kw: Any) -> Any:
        taken[0] += 1
        return await get(*a, **kw)

    pool.get_connection = counted  # type: ignore[method-assign]
    return taken


def test_concurrent_reads_share_one_round_trip_and_each_gets_its_own_value(
    redis_server: Any, raw: redis.Redis, namespace: str
) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace, l1_maxsize=0)
    calls: list[int] = []

    @tiered(cache, name="co")
    async def f(x: int) -> list[int]:
        calls.append(x)
        return [x, x]

    async def scenario() -> None:
        assert await cache.aio.ready(5)
        await asyncio.gather(*(f(x) for x in range(0, 50, 2)))  # even keys stored
        taken = counting(cache)
        calls.clear()
        got = await asyncio.gather(*(f(x) for x in range(50)))  # 25 hits, 25 misses
        assert got == [[x, x] for x in range(50)]
        assert sorted(calls) == list(range(1, 50, 2)), "each miss loads once, hits do not load"
        # one round trip for all 50 reads, then one fill script per miss
        assert taken[0] == 1 + 25, taken
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()


def test_uncoalesced_reads_take_a_round_trip_each(redis_server: Any, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace, l1_maxsize=0, coalesce_reads=False)

    @tiered(cache, name="co")
    async def f(x: int) -> int:
        return x

    async def scenario() -> None:
        await asyncio.gather(*(f(x) for x in range(20)))
        taken = counting(cache)
        assert await asyncio.gather(*(f(x) for x in range(20))) == list(range(20))
        assert taken[0] == 20
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()


def test_a_batch_whose_connection_fails_fails_open_for_every_task(own_redis: Any, namespace: str) -> None:
    cache = TieredCache(own_redis.url, namespace=namespace, l1_maxsize=0, socket_timeout=0.3)

    @tiered(cache, name="co")
    async def f(x: int) -> int:
        return -x

    async def scenario() -> None:
        assert await cache.aio.ready(5)
        own_redis.kill()
        got = await asyncio.gather(*(f(x) for x in range(30)), return_exceptions=True)
        assert got == [-x for x in range(30)], got
        assert cache.stats().backend_errors >= 1
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()


def test_cancelling_the_task_that_sends_the_batch_leaves_the_others_answered(redis_server: Any, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace, l1_maxsize=0)

    @tiered(cache, name="co")
    async def f(x: int) -> int:
        return x * 10

    async def scenario() -> None:
        await asyncio.gather(*(f(x) for x in range(10)))  # stored
        tasks = [asyncio.ensure_future(f(x)) for x in range(10)]
        await asyncio.sleep(0)  # every task has queued its read; the first one sends them
        tasks[0].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError)
        assert done[1:] == [x * 10 for x in range(1, 10)], done
        assert await f(3) == 30  # the connection pool is still usable
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()
