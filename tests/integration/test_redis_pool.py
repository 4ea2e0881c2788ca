"""The connection pool under load: many concurrent callers on a small pool, and an exhausted one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.support import named_clients, named_url
from tiercache import tiered

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def run_concurrently(mode: Any, f: Callable[..., Any], args: list[Any], timeout: float = 30) -> list[Any]:
    """Call ``f(arg)`` for every arg at once (threads in sync mode, tasks in async mode);
    returns the results or the exceptions, in order."""
    if mode.is_async:

        async def one(arg: Any) -> Any:
            try:
                return await f(arg)
            except BaseException as exc:
                return exc

        async def everyone() -> list[Any]:
            return list(await asyncio.wait_for(asyncio.gather(*(one(a) for a in args)), timeout))

        return list(mode.run(everyone()))

    results: list[Any] = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def one_thread(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = f(args[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one_thread, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "callers still running after the timeout"
    return results


def test_200_concurrent_callers_on_a_pool_of_8(mode: Any, own_redis: Any, own_raw: Any, make_cache: Any) -> None:
    cache = make_cache(
        url=named_url(own_redis.url, "tc-pool"), pool_size=8, pool_timeout=30, socket_timeout=5, connect_timeout=5
    )
    calls: list[int] = []

    def load(x: int) -> dict[str, int]:
        calls.append(x)
        time.sleep(0.002)  # a little work: callers overlap
        return {"x": x, "sq": x * x}

    f = tiered(cache, name="pooled")(mode.fn(load))
    # Connections open before: the sync pool's (the subscriber reads the sequence number with it).
    before = named_clients(own_raw, "tc-pool", subscribers=False)
    keys = list(range(200))
    results = run_concurrently(mode, f, keys)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} callers got exceptions, e.g. {errors[0]!r}"
    assert results == [{"x": x, "sq": x * x} for x in keys]
    assert sorted(calls) == keys
    stats = cache.stats()
    assert stats.backend_errors == 0, "callers failed open: the pool did not serve them"
    assert stats.loads == 200
    assert own_raw.exists(*(f.key(x) for x in keys)) == 200, "not every result reached Redis"
    conns = named_clients(own_raw, "tc-pool", subscribers=False)
    opened = conns if not mode.is_async else conns - before  # async mode: another pool
    assert 1 <= opened <= 8, f"{opened} connections opened by one pool with pool_size=8"


def test_exhausted_pool_with_a_tiny_pool_timeout_fails_open(
    mode: Any, own_redis: Any, own_raw: Any, make_cache: Any
) -> None:
    # coalesce_reads=False: coalesced, the two holders would share one connection and the
    # others would not find the pool exhausted (they would wait on the paused server instead).
    cache = make_cache(
        url=own_redis.url,
        pool_size=2,
        pool_timeout=0.05,
        socket_timeout=1.5,
        connect_timeout=1.5,
        coalesce_reads=False,
    )
    calls: list[int] = []
    f = tiered(cache, name="starved")(mode.fn(lambda x: calls.append(x) or -x))
    assert mode.call(f, 0) == 0
    # Pause the server: the next two callers each hold a connection for up to socket_timeout.
    own_raw.execute_command("CLIENT", "PAUSE", "2500", "ALL")

    holders: list[Any] = []
    if mode.is_async:

        async def scenario() -> list[Any]:
            hold = [asyncio.ensure_future(f(-1)), asyncio.ensure_future(f(-2))]
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            others = await asyncio.gather(*(f(x) for x in range(1, 21)), return_exceptions=True)
            elapsed = time.monotonic() - t0
            holders.extend(await asyncio.gather(*hold, return_exceptions=True))
            return [elapsed, others]

        elapsed, others = mode.run(scenario())
    else:
        threads = [threading.Thread(target=lambda x=x: holders.append(f(x))) for x in (-1, -2)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        others = run_concurrently(mode, f, list(range(1, 21)))
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)

    errors = [r for r in others if isinstance(r, BaseException)]
    assert not errors, f"callers got exceptions instead of answers: {errors[0]!r}"
    assert others == [-x for x in range(1, 21)]
    assert elapsed < 1.2, f"callers waited {elapsed:.2f} s for a connection with pool_timeout=0.05"
    assert sorted(holders) == [1, 2]
    assert not any(isinstance(e, redis.RedisError) for e in holders)
    assert cache.stats().backend_errors > 0
