"""User-passed clients, RESP2 and RESP3, and closing: connections really opened and released."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest
import redis
import redis.asyncio

from tests.support import eventually, named_clients, named_url, other_clients, ready
from tiercache import ConfigError, TieredCache, tiered

pytestmark = pytest.mark.redis


def test_user_passed_clients_are_used(mode: Any, redis_server: Any, namespace: str) -> None:
    """client= for sync calls, async_client= for async ones: each in its own db, so we can tell."""
    client = redis.Redis(port=redis_server.port, db=3)
    async_client = redis.asyncio.Redis(port=redis_server.port, db=5)
    cache = ready(TieredCache(client=client, async_client=async_client, namespace=namespace))
    calls: list[int] = []
    f = tiered(cache, name="user_clients", ttl=30)(mode.fn(lambda x: calls.append(x) or x * 10))
    db = {n: redis.Redis(port=redis_server.port, db=n) for n in (0, 3, 5)}
    try:
        assert mode.call(f, 1) == 10
        used = 5 if mode.is_async else 3
        for n, r in db.items():
            assert r.exists(f.key(1)) == (n == used), f"db {n}: expected the value only in db {used}"
        assert 25_000 < db[used].pttl(f.key(1)) <= 30_000
        # A value planted through the user's client is an L2 hit through the cache.
        db[used].set(cache.key("planted"), cache._core.codec.encode(cache.key("planted"), "hello"))
        assert mode.run(mode.api(cache).get("planted")) == "hello"
        mode.run(mode.api(cache).delete("planted"))
        assert db[used].exists(cache.key("planted")) == 0
        assert cache.stats().backend_errors == 0
    finally:
        for r in db.values():
            r.close()
        if mode.is_async:
            mode.run(cache.aclose())
            mode.run(async_client.aclose())
        cache.close()
        client.close()


def test_async_calls_derive_their_pool_from_a_user_sync_client(redis_server: Any, namespace: str) -> None:
    """With client= only, async calls connect with the client's settings (here: db 4)."""
    client = redis.Redis(port=redis_server.port, db=4)
    cache = ready(TieredCache(client=client, namespace=namespace))
    db4 = redis.Redis(port=redis_server.port, db=4)

    @tiered(cache, name="derived")
    async def f(x: int) -> int:
        return x + 1

    async def scenario() -> int:
        try:
            return await f(1)
        finally:
            await cache.aclose()

    try:
        assert asyncio.run(scenario()) == 2
        assert db4.exists(f.key(1)) == 1, "the async pool did not use the client's db"
        assert cache.stats().backend_errors == 0
    finally:
        db4.close()
        cache.close()
        client.close()


def test_clients_decoding_responses_are_refused(redis_server: Any) -> None:
    decoding = redis.Redis(port=redis_server.port, decode_responses=True)
    plain = redis.Redis(port=redis_server.port)
    async_decoding = redis.asyncio.Redis(port=redis_server.port, decode_responses=True)
    try:
        with pytest.raises(ConfigError, match="decode_responses"):
            TieredCache(client=decoding)
        with pytest.raises(ConfigError, match="decode_responses"):
            TieredCache(client=plain, async_client=async_decoding)
        with pytest.raises(ConfigError, match="decode_responses"):
            TieredCache(f"{redis_server.url}?decode_responses=True")
        with pytest.raises(ConfigError):
            TieredCache(redis_server.url, client=plain)
        with pytest.raises(ConfigError):
            TieredCache(async_client=redis.asyncio.Redis(port=redis_server.port))
    finally:
        decoding.close()
        plain.close()
        asyncio.run(async_decoding.aclose())


@pytest.mark.parametrize("protocol", [2, 3])
def test_read_and_write_paths_over_resp2_and_resp3(mode: Any, redis_server: Any, namespace: str, protocol: int) -> None:
    clients = [redis.Redis(port=redis_server.port, protocol=protocol) for _ in range(2)]
    a, b = (ready(TieredCache(client=c, namespace=namespace, ttl=40)) for c in clients)
    raw = redis.Redis(port=redis_server.port)
    calls: list[str] = []

    def load(x: str) -> dict[str, Any]:
        calls.append(x)
        return {"x": x, "n": [1, 2.5, None, True], "b": b"\x00\xff"}

    fa = tiered(a, name="resp")(mode.fn(load))
    fb = tiered(b, name="resp")(mode.fn(load))
    try:
        assert mode.call(fa, "q") == load("q")
        calls.clear()
        assert mode.call(fb, "q") == load("q")  # an L2 hit: the read script's reply parsed
        calls.pop()
        assert calls == []
        assert b.stats().l2_hits == 1
        assert 35_000 < raw.pttl(fa.key("q")) <= 40_000
        assert mode.run(mode.api(b).get("missing", "dflt")) == "dflt"  # the script's nil/false reply
        mode.run(mode.api(a).set("k", [1, 2]))  # the write script's array reply
        assert mode.run(mode.api(b).get("k")) == [1, 2]
        assert mode.call(fa.refresh, "q") == load("q")
        mode.call(fa.invalidate, "q")
        assert raw.exists(fa.key("q")) == 0
        # NOSCRIPT: the script cache flushed under the cache's feet, then reloaded by EVAL.
        raw.script_flush()
        assert mode.run(mode.api(b).get("k")) == [1, 2]
        mode.run(mode.api(a).delete("k"))
        assert raw.exists(a.key("k")) == 0
        assert mode.run(mode.api(a).get("k", "gone")) == "gone"
        assert a.stats().backend_errors == b.stats().backend_errors == 0
        # The connections really speak the protocol asked for.
        resp = {c.get("resp") for c in other_clients(raw) if c.get("db") == "0"}
        assert str(protocol) in resp, f"no RESP{protocol} connection among {resp}"
    finally:
        raw.close()
        for cache in (a, b):
            if mode.is_async:
                mode.run(cache.aclose())
            cache.close()
        for c in clients:
            c.close()


def open_several_connections(cache: TieredCache, n: int = 4) -> None:
    """n concurrent sync misses, so the pool holds several connections."""

    @tiered(cache, name="opener")
    def slow(x: int) -> int:
        threading.Event().wait(0.05)
        return x

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_close_releases_sync_connections(own_redis: Any, own_raw: Any, namespace: str) -> None:
    url = named_url(own_redis.url, "tc-close")
    count = functools.partial(named_clients, own_raw, "tc-close")
    cache = TieredCache(url, namespace=namespace)
    open_several_connections(cache)
    assert count() >= 2
    cache.close()
    eventually(lambda: count() == 0, "connections closed by close()", timeout=5)

    with TieredCache(url, namespace=namespace) as cache:
        open_several_connections(cache)
        assert count() >= 2
    eventually(lambda: count() == 0, "connections closed by `with`", timeout=5)


def test_aclose_releases_async_and_sync_connections(own_redis: Any, own_raw: Any, namespace: str) -> None:
    url = named_url(own_redis.url, "tc-aclose")
    count = functools.partial(named_clients, own_raw, "tc-aclose")

    async def misses(cache: TieredCache, n: int = 4) -> None:
        @tiered(cache, name="aopener")
        async def slow(x: int) -> int:
            await asyncio.sleep(0.05)
            return x

        await asyncio.gather(*(slow(i) for i in range(n)))

    async def scenario() -> None:
        cache = TieredCache(url, namespace=namespace, coalesce_reads=False)
        await misses(cache)
        assert count() >= 2
        open_several_connections(cache, 1)  # the sync pool too
        assert count() >= 3
        await cache.aclose()
        eventually(lambda: count() == 0, "connections closed by aclose()", timeout=5)

        cache = TieredCache(url, namespace=namespace, coalesce_reads=False)
        await misses(cache)
        assert count() >= 2
        await cache.aio.aclose()
        eventually(lambda: count() == 0, "connections closed by aio.aclose()", timeout=5)

        async with TieredCache(url, namespace=namespace, coalesce_reads=False) as cache:
            await misses(cache)
            open_several_connections(cache, 1)
            assert count() >= 3
        eventually(lambda: count() == 0, "connections closed by `async with`", timeout=5)

    asyncio.run(scenario())
