"""Cancelled async loads give their lease back (issue 9, item 8): a load cancelled while its
lease-taking read waits in a coalesced pipeline (or is on its way) releases the lease only
after that read has landed, so no lease marker is left behind for every process to wait on
until ``lease_ttl``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from tiercache import LoadTimeoutError, TieredCache, _async, tiered
from tiercache._remote import LEASE_PREFIX

pytestmark = pytest.mark.redis

LEASE_TTL = 60.0  # a leaked marker outlives the test


def leftover_leases(raw: redis.Redis, namespace: str) -> list[bytes]:
    return [
        key
        for key in raw.scan_iter(match=f"*{namespace}*", count=1000)
        if raw.type(key) == b"string" and (raw.get(key) or b"").startswith(LEASE_PREFIX)
    ]


@pytest.mark.parametrize("coalesce", [True, False])
def test_cancelled_loads_leave_no_lease_behind(
    redis_server: Any, raw: redis.Redis, namespace: str, coalesce: bool
) -> None:
    """Tasks cancelled at every point of their first loop iterations: while their read waits
    to be sent with the batch, while the batch is sent, while their function runs."""
    # Generous timeouts: on a loaded machine a release that times out is lost, which
    # is not what this test is about.
    cache = TieredCache(
        redis_server.url,
        namespace=namespace,
        lease_ttl=LEASE_TTL,
        coalesce_reads=coalesce,
        socket_timeout=5.0,
        connect_timeout=5.0,
        pool_timeout=5.0,
    )

    @tiered(cache, name="slow")
    async def slow(x: int) -> int:
        await asyncio.sleep(30)
        return x

    async def scenario() -> None:
        assert await cache.aio.ready(5)
        for point in range(36):
            tasks = [asyncio.create_task(slow(point * 1000 + i)) for i in range(60)]
            for _ in range(point % 12):
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            # and the cancellation is not lost on the way (none runs on to call the function)
            done, pending = await asyncio.wait(tasks, timeout=5)
            assert not pending and all(t.cancelled() for t in done)
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()
    assert leftover_leases(raw, namespace) == []


def test_a_hard_timeout_storm_leaves_no_lease_behind(redis_server: Any, raw: redis.Redis, namespace: str) -> None:
    """The reported storm: 1,000 tasks of distinct keys whose function outlasts hard_timeout,
    so every load is cancelled by its callers' timeout while the reads are coalesced."""
    cache = TieredCache(
        redis_server.url,
        namespace=namespace,
        lease_ttl=LEASE_TTL,
        socket_timeout=5.0,
        connect_timeout=5.0,
        pool_timeout=5.0,
    )

    @tiered(cache, name="storm", hard_timeout=0.05)
    async def slow(x: int) -> int:
        await asyncio.sleep(0.5)
        return x

    async def scenario() -> None:
        assert await cache.aio.ready(5)
        got = await asyncio.gather(*(slow(i) for i in range(1000)), return_exceptions=True)
        assert all(isinstance(g, LoadTimeoutError) for g in got)
        for _ in range(600):  # the cancelled loads finish their clean-up on their own tasks
            if not _async._TASKS:
                break
            await asyncio.sleep(0.05)
        await cache.aclose()

    asyncio.run(scenario())
    cache.close()
    assert leftover_leases(raw, namespace) == []
