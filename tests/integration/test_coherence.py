"""Coherence between caches on one real Redis: the invalidation bus, its races and its faults.

Several TieredCache instances in one process stand for several processes here (each has its
own node id, L1 and subscriber); tests/integration/test_coherence_processes.py uses real
processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.integration.tcp_proxy import TcpProxy
from tests.support import Mode, RedisServer, eventually, free_port
from tiercache import TieredCache, tiered

pytestmark = pytest.mark.redis


def in_thread(mode: Mode, results: list[Any], f: Callable[..., Any], *args: Any) -> threading.Thread:
    """Start ``f(*args)`` on another thread (with its own event loop in async mode); its
    result is appended to ``results``."""

    def run() -> None:
        m = Mode(mode.name)
        try:
            results.append(m.call(f, *args))
        finally:
            m.close()

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def make_cache(redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    caches: list[TieredCache] = []

    def make(url: str | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("namespace", namespace)
        cache = TieredCache(url or redis_server.url, **kwargs)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.mark.parametrize("outage_l1_ttl", [0.0, None])
def test_l1_without_a_confirmed_subscription(
    make_cache: Callable[..., TieredCache], outage_l1_ttl: float | None
) -> None:
    """Redis never answered, so the bus was never confirmed: with ``outage_l1_ttl=0`` every
    call bypasses L1; by default (an outage: Redis commands fail) L1 keeps the result for at
    most the staleness bound, so the function runs once (see tests/integration/test_outage.py)."""
    dead = make_cache(
        f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.05, staleness_bound=0.4, outage_l1_ttl=outage_l1_ttl
    )
    calls = []

    @tiered(dead)
    def f(x: int) -> int:
        calls.append(x)
        return x

    for _ in range(5):
        assert f(1) == 1
    assert dead.stats().bus_connected is False
    assert not dead.ready(0.2)
    left = dead._core.local.ttl_left(f.key(1))
    if outage_l1_ttl == 0.0:
        assert len(calls) == 5, "with no confirmed subscription every call must bypass L1"
        assert left is None
    else:
        assert len(calls) == 1, "the backend is protected: one call per key per bound"
        assert left is not None
        assert 0 < left <= 0.4


def test_coherent_false_serves_l1_without_a_bus(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache(coherent=False)
    calls = []

    @tiered(cache)
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(1) == f(1) == 1
    assert calls == [1]
    assert cache.stats().bus_connected is None


def test_invalidate_with_wait_reaches_every_node_before_returning(
    make_cache: Callable[..., TieredCache], mode: Mode
) -> None:
    writer, reader = make_cache(), make_cache()
    assert writer.ready() and reader.ready()
    truth = {"v": 1}
    fw = tiered(writer, name="coh.f")(mode.fn(lambda x: truth["v"]))
    fr = tiered(reader, name="coh.f")(mode.fn(lambda x: truth["v"]))
    assert mode.call(fr, 0) == 1
    assert reader._core.local.ttl_left(fr.key(0)) is not None  # in the reader's L1
    truth["v"] = 2
    api = mode.api(writer)
    result = mode.run(api.invalidate(fw.key(0), wait=True))
    assert result.seq is not None and result.receivers == 2
    assert result.acknowledged == 2 and result.complete
    # No sleep: the reader has applied it already.
    assert reader._core.local.ttl_left(fr.key(0)) is None
    assert mode.call(fr, 0) == 2


def test_set_and_delete_reach_the_other_node(make_cache: Callable[..., TieredCache], mode: Mode) -> None:
    a, b = make_cache(), make_cache()
    assert a.ready() and b.ready()
    mode.run(mode.api(a).set("k", "one", wait=True))
    assert mode.run(mode.api(b).get("k")) == "one"
    assert mode.run(mode.api(b).get("k")) == "one"
    assert b.stats().l1_hits >= 1
    mode.run(mode.api(a).set("k", "two", wait=True))
    assert mode.run(mode.api(b).get("k")) == "two"
    result = mode.run(mode.api(a).delete("k", wait=True))
    assert result.acknowledged == result.receivers == 2
    assert mode.run(mode.api(b).get("k", "gone")) == "gone"


def test_without_wait_the_other_node_converges_within_milliseconds(make_cache: Callable[..., TieredCache]) -> None:
    a, b = make_cache(), make_cache()
    assert a.ready() and b.ready()
    a.set("k", 1)
    assert b.get("k") == 1
    start = time.monotonic()
    a.set("k", 2)
    eventually(lambda: b._core.local.ttl_left(b.key("k")) is None, "the entry gone from L1", timeout=1.0)
    assert time.monotonic() - start < 1.0
    assert b.get("k") == 2


def test_own_messages_are_recognised_by_node_id(make_cache: Callable[..., TieredCache]) -> None:
    a = make_cache()
    assert a.ready()
    result = a.set("k", "mine", wait=True)  # our own subscriber has processed our own message
    assert result.acknowledged == result.receivers == 1
    assert a.stats().bus_messages >= 1
    before = a.stats().l1_hits
    assert a.get("k") == "mine"
    assert a.stats().l1_hits == before + 1, "own message must not evict our own fresh write"


@pytest.mark.parametrize("where", ["other-node", "same-node"])
def test_fill_race_a_load_overtaken_by_an_invalidation_stays_out_of_l1(
    make_cache: Callable[..., TieredCache], mode: Mode, where: str
) -> None:
    """The loader blocks until the invalidation has been applied: 0 stale L1 entries."""
    reader = make_cache()
    writer = reader if where == "same-node" else make_cache()
    assert reader.ready() and writer.ready()
    started, release = threading.Event(), threading.Event()
    loads = []

    def body(x: int) -> str:
        loads.append(x)
        if len(loads) == 1:
            started.set()
            assert release.wait(10)
            return "old"
        return "new"

    f = tiered(reader, name="coh.race")(mode.fn(body))
    results: list[Any] = []
    t = in_thread(mode, results, f, 0)
    assert started.wait(10)
    result = writer.invalidate(f.key(0), wait=True)
    assert result.acknowledged == result.receivers
    release.set()
    t.join(10)
    assert results == ["old"], "the overtaken load still answers its own caller"
    assert reader._core.local.ttl_left(f.key(0)) is None, "but its result must not enter L1"
    assert mode.call(f, 0) == "new"
    assert len(loads) == 2


def test_a_sequence_gap_flushes_l1(make_cache: Callable[..., TieredCache], redis_server: RedisServer) -> None:
    cache = make_cache()
    assert cache.ready()
    cache.set("k", 1, wait=True)
    assert cache._core.local.ttl_left(cache.key("k")) is not None
    bus = cache._core.bus
    assert bus is not None and bus.last_seq is not None
    skipped = json.dumps({"n": "someone-else", "s": bus.last_seq + 5, "k": ["unrelated"], "a": ""})
    redis_server.client().publish(bus.channel, skipped)
    eventually(lambda: cache.stats().bus_gaps == 1, "the sequence gap counted")
    assert cache._core.local.ttl_left(cache.key("k")) is None
    assert bus.last_seq is not None and bus.last_seq >= 5


def test_a_malformed_message_flushes_l1(make_cache: Callable[..., TieredCache], redis_server: RedisServer) -> None:
    cache = make_cache()
    assert cache.ready()
    cache.set("k", 1, wait=True)
    bus = cache._core.bus
    assert bus is not None
    redis_server.client().publish(bus.channel, b"\x00garbage")
    eventually(lambda: cache._core.local.ttl_left(cache.key("k")) is None, "the entry gone from L1")
    assert cache.get("k") == 1  # still correct, from Redis


def test_killed_subscriber_connection_flushes_and_resubscribes(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer
) -> None:
    cache = make_cache()
    assert cache.ready()
    cache.set("k", 1, wait=True)
    flushes = cache.stats().bus_flushes
    killed = redis_server.client().client_kill_filter(_type="pubsub")
    assert killed >= 1
    eventually(lambda: cache.stats().bus_flushes >= flushes + 2, "two flushes")  # lost, then resubscribed
    assert cache._core.local.ttl_left(cache.key("k")) is None
    assert cache.ready(5)
    assert cache.get("k") == 1


def test_half_open_subscriber_is_detected_within_the_staleness_bound(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer
) -> None:
    proxy = TcpProxy(redis_server.port)
    try:
        bound = 0.4
        cache = make_cache(proxy.url, staleness_bound=bound, socket_timeout=0.2)
        assert cache.ready()
        cache.set("k", 1)
        assert cache._core.local.ttl_left(cache.key("k")) is not None
        frozen_at = time.monotonic()
        proxy.freeze()
        eventually(lambda: not cache._core.bus.connected.is_set(), "the bus to notice", timeout=bound * 3)  # type: ignore[union-attr]
        detected = time.monotonic() - frozen_at
        assert detected <= bound + 0.25, f"half-open link noticed after {detected:.3f} s, bound {bound} s"
        assert cache._core.local.ttl_left(cache.key("k")) is None
        proxy.thaw()
        assert cache.ready(10)
    finally:
        proxy.close()


def test_wait_reports_fewer_acks_when_a_receiver_is_frozen(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer
) -> None:
    proxy = TcpProxy(redis_server.port)
    try:
        writer = make_cache()
        frozen = make_cache(proxy.url, staleness_bound=30.0)
        assert writer.ready() and frozen.ready()
        proxy.freeze()
        start = time.monotonic()
        result = writer.delete("k", wait=True, timeout=0.3)
        elapsed = time.monotonic() - start
        assert result.receivers == 2
        assert result.acknowledged == 1 and not result.complete
        assert 0.25 <= elapsed < 2.0
    finally:
        proxy.thaw()
        proxy.close()


def test_wait_is_answered_when_redis_fails(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.05)
    result = cache.delete("k", wait=True, timeout=0.2)
    assert result.seq is None and result.receivers is None


def test_messages_carry_keys_and_node_never_values(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer, namespace: str
) -> None:
    cache = make_cache()
    assert cache.ready()
    sub = redis.Redis(port=redis_server.port).pubsub()
    sub.subscribe(f"tc:{namespace}:inval:0")
    eventually(lambda: sub.get_message(timeout=0.05) is not None, "the subscribe confirmation")
    cache.set("k", "SECRET-VALUE")
    cache.delete("a", "b", "c")
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.1)
        if msg and msg["type"] == "message":
            seen.append(json.loads(msg["data"]))
    sub.close()
    assert len(seen) == 2
    assert b"SECRET" not in json.dumps(seen).encode()
    assert seen[0]["k"] == [cache.key("k")] and seen[0]["n"] == cache._core.node_id
    assert seen[1]["k"] == [cache.key(k) for k in "abc"], "one message for the whole batch"
    assert seen[1]["s"] == seen[0]["s"] + 1


def test_stale_fill_is_refused_by_the_lease_even_without_the_bus(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer, mode: Mode
) -> None:
    """Invariant 3 in Redis itself: the reader hears nothing (coherent=False), so only the
    lease can stop its load, computed before the invalidation, from landing after it."""
    reader = make_cache(coherent=False)
    writer = make_cache()
    started, release = threading.Event(), threading.Event()

    def body(x: int) -> str:
        started.set()
        assert release.wait(10)
        return "old"

    f = tiered(reader, name="coh.lease")(mode.fn(body))
    results: list[Any] = []
    t = in_thread(mode, results, f, 0)
    assert started.wait(10)
    raw = redis_server.client()
    marker = raw.get(f.key(0))
    assert marker is not None and marker[:2] == b"\xc7\x00", "the miss took the lease (a marker in the key)"
    writer.invalidate(f.key(0))
    assert raw.get(f.key(0)) is None, "the invalidation deleted the lease marker"
    release.set()
    t.join(10)
    assert results == ["old"]
    assert raw.get(f.key(0)) is None, "a fill computed before the invalidation must not land after it"


def test_a_busy_caller_applies_arrived_invalidations_itself(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer
) -> None:
    """In a CPU-bound process the subscriber thread waits for the GIL, so callers apply what
    has arrived every 256 L1 hits. Made deterministic by telling the subscriber thread that
    callers are polling (it then leaves the socket to them): only a caller can evict."""
    reader, writer = make_cache(), make_cache()
    assert reader.ready() and writer.ready()
    sub = reader._subscriber
    assert sub is not None
    eventually(lambda: sub._raw is not None, "the raw-socket loop running on a real socket")
    truth = {"v": 1}
    f = tiered(reader, name="coh.poll")(lambda k: truth["v"])
    assert f(0) == 1 and f(0) == 1
    sub._polled_at = time.monotonic() + 3600  # the subscriber thread now defers to callers
    truth["v"] = 2
    writer.invalidate(f.key(0))
    readable, _, _ = select.select([sub._raw[0]], [], [], 5)  # the message has arrived
    assert readable
    assert reader._core.local.ttl_left(f.key(0)) is not None, "nobody has read the socket yet"
    seen = [f(0) for _ in range(300)]
    assert seen[0] == 1, "hits before the poll still see the cached value"
    assert seen[-1] == 2, "the 256th hit's poll applied the invalidation"
    sub._polled_at = 0.0


def test_a_refresh_overtaken_by_an_invalidation_is_stored_nowhere(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer, mode: Mode
) -> None:
    """Invariant 3 for refresh(): the value it computed before an invalidation must not land
    in Redis, nor in any L1, after that invalidation."""
    a, b = make_cache(), make_cache()
    assert a.ready() and b.ready()
    started, release = threading.Event(), threading.Event()
    truth = {"v": 1}

    def body(x: int) -> int:
        value = truth["v"]
        if started.is_set():
            return value
        started.set()
        assert release.wait(10)
        return value  # computed from the source before the invalidation below

    f = tiered(a, name="coh.refresh")(mode.fn(body))
    results: list[Any] = []
    t = in_thread(mode, results, f.refresh, 0)
    assert started.wait(10)
    truth["v"] = 2
    result = b.invalidate(f.key(0), wait=True)
    assert result.complete
    release.set()
    t.join(10)
    assert results == [1], "the refresh still answers its own caller"
    assert redis_server.client().get(f.key(0)) is None, "its stale value must not land in Redis"
    assert a._core.local.ttl_left(f.key(0)) is None, "nor in L1"
    assert mode.call(f, 0) == 2


def test_a_call_that_joins_a_cache_get_loads_instead_of_returning_nothing(
    make_cache: Callable[..., TieredCache],
) -> None:
    """``key=`` strings are the keys cache.get uses, so a call can join a get()'s in-flight
    read; when that read finds nothing the call must still run the function."""
    cache = make_cache()
    f = tiered(cache, key=lambda user_id: f"user:{user_id}")(_async_user)

    async def both() -> list[Any]:
        return list(await asyncio.gather(cache.aio.get("user:1", "default"), f(1)))

    assert asyncio.run(both()) == ["default", {"id": 1}]
    asyncio.run(cache.aclose())


async def _async_user(user_id: int) -> dict[str, int]:
    return {"id": user_id}


def test_caches_in_other_databases_neither_hear_nor_count_each_other(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer, namespace: str
) -> None:
    db0 = make_cache(f"redis://127.0.0.1:{redis_server.port}/0")
    db1 = make_cache(f"redis://127.0.0.1:{redis_server.port}/1")
    assert db0.ready() and db1.ready()
    db0.set("k", "zero", wait=True)
    assert db0.get("k") == "zero"
    for i in range(5):
        result = db1.set("k", f"one{i}", wait=True)
        assert result.receivers == 1 and result.complete, "only db 1's subscriber hears db 1"
    assert db0.stats().bus_gaps == 0, "db 1's sequence numbers must not look like gaps in db 0"
    assert db0._core.local.ttl_left(db0.key("k")) is not None, "db 0's L1 keeps its own value"
    assert db0.get("k") == "zero"


def test_a_sequence_counter_that_goes_backwards_flushes_l1(
    make_cache: Callable[..., TieredCache], redis_server: RedisServer
) -> None:
    cache = make_cache()
    assert cache.ready()
    for i in range(3):
        cache.set(f"k{i}", i, wait=True)
    bus = cache._core.bus
    assert bus is not None and bus.last_seq == 3
    redis_server.client().delete(cache._core.seq_key)  # e.g. FLUSHDB or a maxmemory eviction
    other = make_cache()
    assert other.ready()
    other.set("unrelated", 1, wait=True)  # seq 1 again
    eventually(lambda: cache.stats().bus_gaps == 1, "the sequence gap counted")
    assert cache._core.local.ttl_left(cache.key("k0")) is None, "anything may be stale: flushed"


def test_calls_racing_close_never_raise(make_cache: Callable[..., TieredCache]) -> None:
    """A race, so many rounds: before the fix a TypeError from a socket the pool had just
    closed reached callers in about one round in three."""
    errors: list[BaseException] = []
    for _ in range(12):
        cache = make_cache(ttl=60)
        f = tiered(cache, name="pair")(lambda k, i: (k, i))
        done: list[int] = []  # calls answered
        stop = threading.Event()

        def hammer(k: int, f: Callable[..., Any] = f, done: list[int] = done, stop: threading.Event = stop) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    assert f(k, i) == (k, i)
                    done.append(i)
                except BaseException as exc:
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        eventually(lambda done=done: len(done) >= 50, "calls running when close() came")
        cache.close()
        answered = len(done)
        eventually(lambda done=done, n=answered: len(done) >= n + 50, "calls going on after close()")
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [], errors[:3]


def test_the_subscriber_works_with_file_descriptors_above_1024(
    make_cache: Callable[..., TieredCache],
) -> None:
    """select() cannot watch descriptors >= 1024; busy servers have that many open files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the test needs RLIMIT_NOFILE >= 1200, this machine allows {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    pipes = [os.pipe() for _ in range(560)]  # 1,120 descriptors
    try:
        cache = make_cache()
        assert cache.ready()
        sub = cache._subscriber
        assert sub is not None
        eventually(lambda: sub._raw is not None, "the raw-socket loop")
        assert sub._raw is not None and sub._raw[0].fileno() >= 1024
        flushes = cache.stats().bus_flushes
        cache.set("k", 1, wait=True)
        assert cache.get("k") == 1
        time.sleep(0.3)
        assert cache.stats().bus_flushes == flushes, "the subscriber must not keep reconnecting"
        assert cache.stats().bus_connected
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
