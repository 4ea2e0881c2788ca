"""``f.key(...)`` and ``await f.akey(...)``: the Redis key of a call of a function with tags or a
tenant depends on their versions, read from Redis; an async function's ``akey`` reads them on
the event loop, never through the blocking sync pool (issue 10)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

from tests.support import FakeRedisCaches, Mode
from tiercache import BackendError, TieredCache, tiered, tiered_batch


@pytest.fixture
def redis(mode: Mode) -> Iterator[FakeRedisCaches]:
    deployment = FakeRedisCaches(mode, "akey")
    yield deployment
    deployment.close()


@pytest.fixture
def aio() -> Iterator[FakeRedisCaches]:
    """Caches on fakeredis used from one event loop (``aio.mode.run(coroutine)``)."""
    mode = Mode("async")
    deployment = FakeRedisCaches(mode, "akey-aio")
    yield deployment
    deployment.server.connected = True
    deployment.close()
    mode.close()


def key_of(mode: Mode, f: Any, *args: Any) -> str:
    """The call's key as the mode's code gets it: ``f.key`` (sync), ``await f.akey`` (async)."""
    key: str = mode.run(f.akey(*args)) if mode.is_async else f.key(*args)
    return key


def counting(mode: Mode, body: Callable[..., Any]) -> tuple[list[Any], Callable[..., Any]]:
    calls: list[Any] = []

    def counted(*args: Any) -> Any:
        calls.append(args)
        return body(*args)

    counted.__name__ = counted.__qualname__ = body.__name__
    return calls, mode.fn(counted)


def test_key_follows_tag_versions(mode: Mode, redis: FakeRedisCaches) -> None:
    cache = redis.cache()
    api = mode.api(cache)

    def profile(user: int) -> str:
        return f"user {user}"

    calls, fn = counting(mode, profile)
    f = tiered(cache, tags=lambda user: [f"user:{user}"])(fn)
    assert mode.call(f, 1) == "user 1"
    first, other = key_of(mode, f, 1), key_of(mode, f, 2)
    assert first == f.key(1) and first != other  # the sync key agrees, on an async function too

    mode.run(api.invalidate_tags("user:1"))
    assert key_of(mode, f, 1) != first  # the tag's new version
    assert key_of(mode, f, 2) == other
    assert mode.call(f, 1) == "user 1" and len(calls) == 2

    mode.run(api.invalidate(key_of(mode, f, 1), wait=True))  # the key this call uses now
    assert mode.call(f, 1) == "user 1" and len(calls) == 3


def test_key_follows_the_tenant_of_the_scope_and_of_tenant_fn(mode: Mode, redis: FakeRedisCaches) -> None:
    cache = redis.cache(tenants=True)
    api = mode.api(cache)

    def report(org: str, day: int) -> str:
        return f"{org} {day}"

    scoped = tiered(cache)(mode.fn(report))
    by_argument = tiered(cache, tenant=lambda org, day: org, name="by_argument")(mode.fn(report))

    with cache.tenant("acme"):
        acme = key_of(mode, scoped, "x", 1)
        assert acme == scoped.key("x", 1)
    with cache.tenant("other"):
        assert key_of(mode, scoped, "x", 1) != acme
    acme_by_argument = key_of(mode, by_argument, "acme", 1)
    assert acme_by_argument == by_argument.key("acme", 1)

    mode.run(api.invalidate_tenant("acme"))
    with cache.tenant("acme"):
        assert key_of(mode, scoped, "x", 1) != acme
    assert key_of(mode, by_argument, "acme", 1) != acme_by_argument
    assert key_of(mode, by_argument, "other", 1) == by_argument.key("other", 1)


def test_akey_reads_versions_on_the_event_loop_not_the_sync_pool(
    aio: FakeRedisCaches, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_client = fakeredis.FakeRedis(server=aio.server)
    # l1_ttl=0: versions are not kept in L1, so every key reads them from Redis
    async_client = fakeredis.FakeAsyncRedis(server=aio.server)
    cache = TieredCache(client=sync_client, async_client=async_client, namespace=aio.namespace, l1_ttl=0)
    aio.caches.append(cache)
    assert cache.ready(5)
    taken: list[object] = []
    get_connection = sync_client.connection_pool.get_connection

    def spy(*args: Any, **kwargs: Any) -> Any:
        taken.append(args)
        return get_connection(*args, **kwargs)

    monkeypatch.setattr(sync_client.connection_pool, "get_connection", spy)

    @tiered(cache, tags=["reports"])
    async def report(day: int) -> str:
        await asyncio.sleep(0)
        return f"report {day}"

    run = aio.mode.run
    keys = [run(report.akey(day)) for day in range(3)]
    run(cache.aio.invalidate_tags("reports"))
    keys.append(run(report.akey(0)))
    assert taken == []  # every version read went through the async pool, on the loop
    assert keys[3] != keys[0] and len(set(keys)) == 4
    assert report.key(0) == keys[3]
    assert taken  # while the sync key took a connection of the sync pool


def test_akey_of_a_bound_method_and_of_an_unscoped_function(aio: FakeRedisCaches) -> None:
    cache = aio.cache()

    class Repo:
        @tiered(cache, tags=["repo"])
        async def find(self, item: int) -> int:
            await asyncio.sleep(0)
            return item

        @tiered(cache, tags=["repo"])
        def find_sync(self, item: int) -> int:
            return item

    @tiered(cache)
    async def unscoped(item: int) -> int:
        await asyncio.sleep(0)
        return item

    repo = Repo()
    assert aio.mode.run(repo.find.akey(1)) == repo.find.key(1) == Repo().find.key(1)
    assert aio.mode.run(unscoped.akey(1)) == unscoped.key(1)
    with pytest.raises(AttributeError, match="sync"):
        repo.find_sync.akey(1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("strict", [False, True])
def test_akey_when_redis_is_down(aio: FakeRedisCaches, strict: bool) -> None:
    """Like ``key``: the key at the versions this process knew last (strict: BackendError)."""
    cache = aio.cache(strict=strict, l1_ttl=0)

    @tiered(cache, tags=["t"])
    async def f(x: int) -> int:
        await asyncio.sleep(0)
        return x

    known = aio.mode.run(f.akey(1))
    aio.server.connected = False
    if strict:
        with pytest.raises(BackendError):
            aio.mode.run(f.akey(1))
    else:
        assert aio.mode.run(f.akey(1)) == known == f.key(1)


def test_akeys_of_a_batch_function_follow_the_tenant(aio: FakeRedisCaches) -> None:
    cache = aio.cache(tenants=True, l1_ttl=0)

    @tiered_batch(cache)
    async def lengths(words: list[str]) -> list[int]:
        await asyncio.sleep(0)
        return [len(w) for w in words]

    run = aio.mode.run
    with cache.tenant("acme"):
        before = run(lengths.akeys(["a", "bb", "a"]))
        assert before == lengths.keys(["a", "bb", "a"]) and before[0] == before[2] != before[1]
    run(cache.aio.invalidate_tenant("acme"))
    with cache.tenant("acme"):
        assert run(lengths.akeys(["a"])) == lengths.keys(["a"]) != before[:1]
