"""Regressions found by the independent review of the stampede and workload changes."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from tests.support import Clock, eventually
from tiercache import TieredCache, tiered
from tiercache._remote import await_ack

pytestmark = pytest.mark.redis


def test_racing_clears_leave_every_process_on_the_latest_generation(
    redis_server: Any, raw: redis.Redis, namespace: str
) -> None:
    a, b = (TieredCache(redis_server.url, namespace=namespace) for _ in range(2))
    try:
        assert a.ready(5) and b.ready(5)
        for _ in range(30):
            threads = [threading.Thread(target=c.clear) for c in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            latest = raw.get(f"tc:{namespace}:gen").decode()
            eventually(
                lambda g=latest: a._core.keyspace.generation == b._core.keyspace.generation == g,
                f"both caches on the latest generation {latest}",
            )
    finally:
        a.close()
        b.close()


def test_a_stale_copy_is_not_served_once_the_entry_was_invalidated_during_the_load() -> None:
    clock = Clock(0.0, frozen=True)
    cache = TieredCache(namespace="review-stale", clock=clock)
    started, go = threading.Event(), threading.Event()
    state = {"n": 0}

    @tiered(cache, ttl=10, stale_ttl=100)
    def price(sku: str) -> str:
        state["n"] += 1
        if state["n"] == 1:
            return "OLD"
        started.set()
        go.wait(5)
        raise ConnectionError("upstream down")

    assert price("a") == "OLD"
    clock.advance(11)  # expired, within stale_ttl
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(_call(price, "a")))
    t.start()
    assert started.wait(5)
    price.invalidate("a")  # the value is known to be outdated now
    go.set()
    t.join(5)
    assert isinstance(outcome[0], ConnectionError), outcome
    assert cache.stats().stale_served == 0


def _call(f: Any, *args: Any) -> Any:
    try:
        return f(*args)
    except Exception as exc:
        return exc


def test_blocking_commands_are_never_coalesced_with_reads() -> None:
    assert await_ack("tc:x:ack:1", 0.1).coalesce is False


def test_a_foreign_tag_counter_fails_open(redis_server: Any, raw: redis.Redis, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace)
    try:
        assert cache.ready(5)

        @tiered(cache, tags=["t"])
        def g(x: int) -> int:
            return x * 2

        raw.set(f"tc:{namespace}:tag:{{t}}", "not-a-number")
        assert g(1) == 2  # answered by the function; nothing cached under an unknown key
        assert cache.stats().backend_errors >= 1
    finally:
        cache.close()


def test_waits_for_other_processes_leave_no_signals_behind(redis_server: Any, raw: redis.Redis, namespace: str) -> None:
    holder = TieredCache(redis_server.url, namespace=namespace, coherent=False)
    waiter = TieredCache(redis_server.url, namespace=namespace, coherent=False)
    try:
        release = threading.Event()

        @tiered(holder, name="w")
        def slow(x: int) -> int:
            release.wait(5)
            return x

        @tiered(waiter, name="w")
        def fast(x: int) -> int:
            return -x

        threads = [threading.Thread(target=slow, args=(x,)) for x in range(5)]
        for t in threads:
            t.start()
        eventually(lambda: all(raw.get(slow.key(x)) is not None for x in range(5)), "the five values in Redis")
        releaser = threading.Timer(0.1, release.set)
        releaser.start()
        assert [fast(x) for x in range(5)] == list(range(5))  # the holder's values, waited for
        for t in threads:
            t.join(5)
        assert len(waiter._core.flights._fills) == 0
    finally:
        holder.close()
        waiter.close()


@pytest.mark.parametrize("lost", ["deleted", "foreign"])
def test_clear_works_after_the_generation_counter_was_lost(
    redis_server: Any, raw: redis.Redis, namespace: str, lost: str
) -> None:
    a, b = (TieredCache(redis_server.url, namespace=namespace) for _ in range(2))
    try:
        assert a.ready(5) and b.ready(5)
        for _ in range(3):
            a.clear()
        a.set("k", "old")
        if lost == "deleted":
            raw.delete(f"tc:{namespace}:gen")  # an eviction, a FLUSHDB, an operator
        else:
            raw.set(f"tc:{namespace}:gen", "9f3a1c0b7e2d")  # not a number
        result = a.clear(wait=True)
        assert result.seq is not None, result
        assert a.get("k") is None
        eventually(lambda: b.get("k") is None, "b to drop k")
        assert a._core.keyspace.generation == b._core.keyspace.generation
    finally:
        a.close()
        b.close()


def test_an_unreadable_reply_does_not_open_the_breaker(redis_server: Any, raw: redis.Redis, namespace: str) -> None:
    cache = TieredCache(redis_server.url, namespace=namespace, breaker_threshold=2)
    try:
        assert cache.ready(5)

        @tiered(cache, tags=["users"])
        def tagged(x: int) -> int:
            return x

        @tiered(cache)
        def other(x: int) -> int:
            return -x

        other(1)
        raw.set(f"tc:{namespace}:tag:{{users}}", "not-a-number")
        for i in range(5):
            assert tagged(i) == i
        assert not cache._core.breaker.is_open
        before = cache.stats().l2_hits
        cache._core.local.clear()
        assert other(1) == -1
        assert cache.stats().l2_hits == before + 1, "Redis was skipped: the breaker counted a data problem"
    finally:
        cache.close()
