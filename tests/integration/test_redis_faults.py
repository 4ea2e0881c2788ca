"""Faults of a real redis-server owned by the test: killed, restarted, paused (slow), strict mode."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
import redis

from tests.support import eventually, ready
from tiercache import BackendError, TieredCache, tiered

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def pause(raw: redis.Redis, ms: int) -> None:
    """CLIENT PAUSE ``ms`` ALL, issued from a client of the test (not the cache's)."""
    assert raw.execute_command("CLIENT", "PAUSE", str(ms), "ALL") in (True, b"OK", "OK")


def test_fail_open_while_the_server_dies_then_recovery(own_redis: Any, own_raw: Any, namespace: str) -> None:
    # Timeouts generous enough that a loaded machine fails nothing before the kill (a dead
    # server refuses connections at once, so they do not slow the part after it).
    cache = ready(TieredCache(own_redis.url, namespace=namespace, socket_timeout=2.0, connect_timeout=2.0))
    lock = threading.Lock()
    errors: list[BaseException] = []
    wrong: list[tuple[str, int, Any]] = []
    answered = {"sync": 0, "async": 0}
    stop = threading.Event()

    @tiered(cache, name="square")
    def square(x: int) -> int:
        return x * x

    @tiered(cache, name="cube")
    async def cube(x: int) -> int:
        await asyncio.sleep(0)
        return x * x * x

    def pick(rnd: random.Random) -> int:
        # Half hot keys (answered from L1 once loaded), half cold ones (misses that need Redis).
        return rnd.randrange(20) if rnd.random() < 0.5 else rnd.randrange(20, 10**9)

    def record(kind: str, x: int, value: Any, expected: int) -> None:
        with lock:
            answered[kind] += 1
            if value != expected:
                wrong.append((kind, x, value))

    def sync_worker(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            x = pick(rnd)
            try:
                value = square(x)
            except BaseException as exc:
                errors.append(exc)
                return
            record("sync", x, value, x * x)

    async def async_main() -> None:
        async def worker(seed: int) -> None:
            rnd = random.Random(seed)
            while not stop.is_set():
                x = pick(rnd)
                try:
                    value = await cube(x)
                except BaseException as exc:
                    errors.append(exc)
                    return
                record("async", x, value, x * x * x)
                await asyncio.sleep(0)

        # No aclose(): the cache lives on after this loop, as in a program that runs a loop per job.
        await asyncio.gather(*(worker(100 + i) for i in range(4)))

    threads = [threading.Thread(target=sync_worker, args=(i,)) for i in range(4)]
    async_thread = threading.Thread(target=lambda: asyncio.run(async_main()))
    try:
        for t in [*threads, async_thread]:
            t.start()
        eventually(lambda: min(answered.values()) >= 100, "answers before the kill", timeout=10)
        assert cache.stats().backend_errors == 0
        assert own_raw.dbsize() > 0

        own_redis.kill()
        killed_at = dict(answered)
        eventually(
            lambda: cache.stats().backend_errors >= 5 and all(answered[k] >= killed_at[k] + 300 for k in answered),
            "answers while Redis is dead",
            timeout=15,
        )
        # The breaker is open now: callers no longer wait for Redis at all.
        t0 = time.monotonic()
        assert [square(10**9 + i) for i in range(50)] == [(10**9 + i) ** 2 for i in range(50)]
        assert time.monotonic() - t0 < 1.0, "callers kept waiting for a dead Redis"
    finally:
        stop.set()
        for t in [*threads, async_thread]:
            t.join(15)
    assert not any(t.is_alive() for t in [*threads, async_thread]), "a caller hung"
    assert errors == [], f"exceptions reached the callers: {errors[:3]!r}"
    assert wrong == [], f"wrong answers: {wrong[:5]!r}"
    assert cache.stats().backend_errors > 0

    # The same server comes back on the same port: the cache writes to it again once the
    # breaker lets a probe through (cooldown 1 s).
    own_redis.start()
    probe = iter(range(2 * 10**9, 3 * 10**9))

    def sync_writes_again() -> bool:
        x = next(probe)
        assert square(x) == x * x
        return bool(own_raw.exists(square.key(x)))

    eventually(sync_writes_again, "sync calls writing to the restarted Redis", timeout=10, interval=0.05)
    # The invalidation subscriber is back too, so L1 is served again.
    eventually(lambda: cache.stats().bus_connected, "the subscriber resubscribed", timeout=10)
    x = next(probe)
    assert square(x) == x * x
    hits = cache.stats().l1_hits
    assert square(x) == x * x
    assert cache.stats().l1_hits == hits + 1, "L1 not served after recovery"

    async def async_writes_again() -> None:
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                x = next(probe)
                assert await cube(x) == x**3
                if own_raw.exists(cube.key(x)):
                    return
                await asyncio.sleep(0.05)
            pytest.fail("async calls did not write to the restarted Redis within 10 s")
        finally:
            await cache.aclose()

    asyncio.run(async_writes_again())
    cache.close()


@pytest.fixture
def dead_server_cache(own_redis: Any, make_cache: Any, mode: Any) -> Any:
    """A strict cache whose server has just been killed, with one value loaded before (in L1)."""
    cache = make_cache(url=own_redis.url, strict=True, socket_timeout=0.25, connect_timeout=0.25)
    calls: list[int] = []
    f = tiered(cache, name="strict")(mode.fn(lambda x: calls.append(x) or x + 1))
    assert mode.call(f, 0) == 1
    own_redis.kill()
    return cache, f, calls


def test_strict_mode_raises_backend_error_caused_by_redis(mode: Any, dead_server_cache: Any) -> None:
    cache, f, _ = dead_server_cache
    with pytest.raises(BackendError) as info:
        mode.call(f, 1)
    assert isinstance(info.value.__cause__, redis.RedisError), f"cause: {info.value.__cause__!r}"
    with pytest.raises(BackendError) as info:
        mode.run(mode.api(cache).get("anything"))
    assert isinstance(info.value.__cause__, redis.RedisError)
    with pytest.raises(BackendError) as info:
        mode.run(mode.api(cache).set("anything", 1))
    assert isinstance(info.value.__cause__, redis.RedisError)
    assert cache.stats().backend_errors >= 3


def test_strict_mode_every_backend_error_has_a_redis_cause(mode: Any, dead_server_cache: Any) -> None:
    """errors.py: BackendError is "raised only with strict=True (the redis-py error is __cause__)",
    also once the circuit breaker has opened after repeated failures."""
    _, f, _ = dead_server_cache
    causes = []
    for i in range(1, 11):
        with pytest.raises(BackendError) as info:
            mode.call(f, i)
        causes.append(info.value.__cause__)
    bad = [(i, c) for i, c in enumerate(causes, 1) if not isinstance(c, redis.RedisError)]
    assert not bad, f"BackendError without a redis-py cause on calls {[i for i, _ in bad]}: {bad[0][1]!r}"


def test_strict_mode_on_a_paused_server_raises_within_the_socket_timeout(
    mode: Any, own_redis: Any, own_raw: Any, make_cache: Any
) -> None:
    cache = make_cache(url=own_redis.url, strict=True, socket_timeout=0.1, connect_timeout=0.1)
    f = tiered(cache, name="strict_paused")(mode.fn(lambda x: x))
    assert mode.call(f, 0) == 0
    pause(own_raw, 1500)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as info:
        mode.call(f, 1)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(info.value.__cause__, redis.RedisError), f"cause: {info.value.__cause__!r}"


def test_slow_redis_calls_still_answer_in_bounded_time(
    mode: Any, own_redis: Any, own_raw: Any, make_cache: Any
) -> None:
    cache = make_cache(url=own_redis.url, socket_timeout=0.1, connect_timeout=0.1)
    calls: list[int] = []
    f = tiered(cache, name="paused")(mode.fn(lambda x: calls.append(x) or [x, "computed"]))
    assert mode.call(f, 0) == [0, "computed"]  # connected, script loaded, value in L1
    pause(own_raw, 2000)
    t_start = time.monotonic()
    slowest = 0.0
    for i in range(1, 13):
        t0 = time.monotonic()
        assert mode.call(f, i) == [i, "computed"]
        assert mode.call(f, 0) == [0, "computed"]  # from L1, or recomputed once L1 is flushed
        slowest = max(slowest, time.monotonic() - t0)
    total = time.monotonic() - t_start
    assert slowest < 0.6, f"one call took {slowest:.2f} s with socket_timeout=0.1"
    assert total < 1.8, f"12 calls took {total:.2f} s against a paused Redis"
    assert set(calls) == set(range(13))  # L1 may be flushed meanwhile: the subscriber's PING times out too
    assert cache.stats().backend_errors > 0
    # The same through the user-key API, which must answer (default) rather than raise.
    assert mode.run(mode.api(cache).get("nothing", "dflt")) == "dflt"
    mode.run(mode.api(cache).set("k", 1))  # fails open: no exception
