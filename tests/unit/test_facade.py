"""TieredCache and cache.aio over fakeredis, through the sync and the async driver (``mode``)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

from tests.support import Clock, FakeRedisCaches
from tiercache import MISSING, CodecError, ConfigError, TieredCache, tiered


@dataclasses.dataclass(frozen=True)
class Item:
    sku: str
    qty: int


class Tier(enum.Enum):
    GOLD = "gold"
    SILVER = "silver"


class Env(FakeRedisCaches):
    """Caches on one fakeredis server, sharing a manual clock."""

    def __init__(self, mode: Any) -> None:
        self.clock = Clock(5000.0, frozen=True)
        super().__init__(mode, "facade", clock=self.clock)


@pytest.fixture
def env(mode: Any) -> Iterator[Env]:
    e = Env(mode)
    yield e
    e.close()


def counting(mode: Any, calls: list[Any], result: Callable[..., Any] = lambda x: [x]) -> Callable[..., Any]:
    def body(x: Any) -> Any:
        calls.append(x)
        return result(x)

    return mode.fn(body)


# -- get / set / delete -----------------------------------------------------------------------


def test_get_set_delete(mode: Any, env: Env) -> None:
    cache = env.cache()
    api = mode.api(cache)
    assert mode.run(api.get("a")) is None
    assert mode.run(api.get("a", "dflt")) == "dflt"
    mode.run(api.set("a", {"x": [1, 2]}))
    mode.run(api.set("b", None))
    mode.run(api.set("c", 3))
    assert mode.run(api.get("a")) == {"x": [1, 2]}
    assert mode.run(api.get("b", "dflt")) is None  # a stored None is a value, not a miss
    mode.run(api.delete("a", "b"))
    assert mode.run(api.get("a", "gone")) == "gone"
    assert mode.run(api.get("b", "gone")) == "gone"
    assert mode.run(api.get("c")) == 3
    assert env.raw.get(cache.key("a")) is None
    assert env.raw.get(cache.key("c")) is not None
    mode.run(api.delete())  # nothing to delete: no error


def test_values_round_trip_through_redis(mode: Any, env: Env) -> None:
    writer = env.cache()
    reader = env.cache()  # another process: empty L1, same Redis
    reader.serializer.register(Item, Tier)  # type: ignore[attr-defined]
    value = {"items": [Item("a", 1)], "tier": Tier.GOLD, "t": (1, 2), "s": {1, 2}, 7: b"\x00"}
    mode.run(mode.api(writer).set("v", value))
    assert mode.run(mode.api(reader).get("v")) == value
    assert reader.stats().l2_hits == 1


def test_set_overwrites_and_other_reader_sees_it(mode: Any, env: Env) -> None:
    cache = env.cache()
    other = env.cache()
    api = mode.api(cache)
    mode.run(api.set("k", 1))
    mode.run(api.set("k", 2))
    assert mode.run(api.get("k")) == 2
    assert mode.run(mode.api(other).get("k")) == 2


def test_unencodable_set_raises(mode: Any, env: Env) -> None:
    cache = env.cache()
    with pytest.raises(CodecError):
        mode.run(mode.api(cache).set("k", object()))
    assert env.raw.get(cache.key("k")) is None
    assert mode.run(mode.api(cache).get("k", "none")) == "none"


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "5"])
def test_set_with_bad_ttl_is_config_error(mode: Any, env: Env, ttl: Any) -> None:
    cache = env.cache()
    with pytest.raises(ConfigError, match="ttl"):
        mode.run(mode.api(cache).set("k", 1, ttl=ttl))


def test_writes_report_their_sequence_numbers(mode: Any, env: Env) -> None:
    cache = env.cache()
    api = mode.api(cache)
    first = mode.run(api.set("a", 1))
    second = mode.run(api.delete("a"))
    assert isinstance(first.seq, int)
    assert second.seq == first.seq + 1
    assert first.acknowledged is None
    with pytest.raises(ConfigError, match="timeout"):
        mode.run(api.set("a", 1, wait=True, timeout=-1))


# -- TTLs ---------------------------------------------------------------------------------------


def test_set_ttl_reaches_redis_and_bounds_l1(mode: Any, env: Env) -> None:
    cache = env.cache(ttl=300, l1_ttl=60)
    api = mode.api(cache)
    mode.run(api.set("short", 1, ttl=5))
    assert 4000 < env.raw.pttl(cache.key("short")) <= 5000
    assert cache._core.local.ttl_left(cache.key("short")) == pytest.approx(5)
    mode.run(api.set("l1", 1, l1_ttl=2))
    assert 299_000 < env.raw.pttl(cache.key("l1")) <= 300_000
    assert cache._core.local.ttl_left(cache.key("l1")) == pytest.approx(2)
    mode.run(api.set("default", 1))
    assert 299_000 < env.raw.pttl(cache.key("default")) <= 300_000
    assert cache._core.local.ttl_left(cache.key("default")) == pytest.approx(60)


def test_l1_ttl_never_exceeds_redis_pttl(mode: Any, env: Env) -> None:
    cache = env.cache(l1_ttl=60)
    key = cache.key("planted")
    env.raw.set(key, cache._core.codec.encode(key, "v"), px=1500)
    assert mode.run(mode.api(cache).get("planted")) == "v"
    left = cache._core.local.ttl_left(key)
    assert left is not None
    assert 0 < left <= 1.5 + 1e-6

    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls))
    fkey = f.key(1)
    env.raw.set(fkey, cache._core.codec.encode(fkey, ["from redis"]), px=800)
    assert mode.call(f, 1) == ["from redis"]
    assert calls == []
    left = cache._core.local.ttl_left(fkey)
    assert left is not None
    assert 0 < left <= 0.8 + 1e-6


def test_redis_key_without_expiry_gets_l1_ttl(mode: Any, env: Env) -> None:
    cache = env.cache(l1_ttl=30)
    key = cache.key("persistent")
    env.raw.set(key, cache._core.codec.encode(key, "v"))
    assert mode.run(mode.api(cache).get("persistent")) == "v"
    assert cache._core.local.ttl_left(key) == pytest.approx(30)


def test_function_ttls(mode: Any, env: Env) -> None:
    cache = env.cache(ttl=300, l1_ttl=60)
    calls: list[Any] = []
    both = tiered(cache, ttl=7, l1_ttl=3)(counting(mode, calls))
    short = tiered(cache, ttl=2, name="short")(counting(mode, calls))
    mode.call(both, 1)
    mode.call(short, 1)
    assert 6000 < env.raw.pttl(both.key(1)) <= 7000
    assert cache._core.local.ttl_left(both.key(1)) == pytest.approx(3)
    assert 1000 < env.raw.pttl(short.key(1)) <= 2000
    assert cache._core.local.ttl_left(short.key(1)) == pytest.approx(2)


def test_l1_expiry_falls_back_to_redis(mode: Any, env: Env) -> None:
    cache = env.cache(l1_ttl=10)
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls))
    assert mode.call(f, 1) == [1]
    env.clock.advance(9.9)
    assert mode.call(f, 1) == [1]
    assert cache.stats().l1_hits == 1
    env.clock.advance(0.2)
    assert mode.call(f, 1) == [1]
    assert cache.stats().l2_hits == 1
    assert calls == [1]


# -- stats --------------------------------------------------------------------------------------


def test_stats_counters(mode: Any, env: Env) -> None:
    cache = env.cache()
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls))

    def boom(x: int) -> int:
        raise KeyError(x)

    g = tiered(cache)(mode.fn(boom))
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (0, 0, 0, 0, 0)

    mode.call(f, 1)
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (0, 0, 1, 1, 0)
    assert s.l1_size == 1 and s.l1_bytes > 0

    mode.call(f, 1)
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (1, 0, 1, 1, 0)

    cache._core.local.clear()
    mode.call(f, 1)
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (1, 1, 1, 1, 0)

    with pytest.raises(KeyError):
        mode.call(g, 2)
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (1, 1, 2, 2, 1)

    assert mode.run(mode.api(cache).get("nothing")) is None
    s = cache.stats()
    assert (s.l1_hits, s.l2_hits, s.misses, s.loads, s.load_errors) == (1, 1, 3, 2, 1)
    assert s.in_flight == 0
    assert s.backend_errors == 0
    assert s.codec_errors == 0
    assert s.hit_ratio == pytest.approx(2 / 5)
    assert calls == [1]


# -- bad bytes in Redis -------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"garbage", b"", b"\xc7\x01\x01\x00\xc1", b"\xc7\x01\x01\x05xx"])
def test_garbage_in_redis_is_a_miss_and_is_overwritten(mode: Any, env: Env, garbage: bytes) -> None:
    cache = env.cache()
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls))
    key = f.key(9)
    env.raw.set(key, garbage)
    assert mode.call(f, 9) == [9]
    assert calls == [9]
    assert cache.stats().codec_errors == 1
    assert cache.stats().misses == 1
    stored = env.raw.get(key)
    assert stored is not None and stored != garbage
    assert cache._core.codec.decode(key, stored) == [9]

    env.raw.set(cache.key("g"), garbage)
    assert mode.run(mode.api(cache).get("g", "dflt")) == "dflt"
    assert cache.stats().codec_errors == 2


def test_unregistered_class_in_redis_is_a_miss(mode: Any, env: Env) -> None:
    writer = env.cache()
    mode.run(mode.api(writer).set("item", Item("x", 1)))  # the writer learns Item by encoding it
    reader = env.cache()
    assert mode.run(mode.api(reader).get("item", "miss")) == "miss"
    assert reader.stats().codec_errors == 1


# -- functions ------------------------------------------------------------------------------------


CALLS: list[str] = []


def make_item(sku: str) -> Item:
    CALLS.append(sku)
    return Item(sku, len(CALLS))


async def amake_item(sku: str) -> Item:
    CALLS.append(sku)
    return Item(sku, len(CALLS))


def make_item_unannotated(sku):  # type: ignore[no-untyped-def]
    CALLS.append(sku)
    return Item(sku, len(CALLS))


async def amake_item_unannotated(sku):  # type: ignore[no-untyped-def]
    CALLS.append(sku)
    return Item(sku, len(CALLS))


@pytest.mark.parametrize("annotated", [True, False])
def test_return_annotation_registers_classes(mode: Any, env: Env, annotated: bool) -> None:
    """A reader that never encoded Item decodes it from Redis because its return annotation names it."""
    CALLS.clear()
    writer = env.cache()
    fn = amake_item if mode.is_async else make_item
    w = tiered(writer, name="make_item")(fn)
    assert mode.call(w, "abc") == Item("abc", 1)
    reader = env.cache()
    if annotated:
        r = tiered(reader, name="make_item")(fn)
    else:
        plain = amake_item_unannotated if mode.is_async else make_item_unannotated
        r = tiered(reader, name="make_item")(plain)
    got = mode.call(r, "abc")
    if annotated:
        assert got == Item("abc", 1)  # decoded from Redis, not reloaded
        assert CALLS == ["abc"]
        assert reader.stats().l2_hits == 1
    else:
        assert got == Item("abc", 2)  # unregistered class: a miss, reloaded
        assert reader.stats().codec_errors == 1


def test_none_results_are_cached(mode: Any, env: Env) -> None:
    cache = env.cache()
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls, lambda x: None))
    assert mode.call(f, 1) is None
    assert mode.call(f, 1) is None
    cache._core.local.clear()
    assert mode.call(f, 1) is None
    assert calls == [1]


def test_invalidate_and_refresh(mode: Any, env: Env) -> None:
    cache = env.cache()
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls, lambda x: [x, len(calls)]))
    assert mode.call(f, 1) == [1, 1]
    assert mode.call(f, 1) == [1, 1]
    mode.run(f.invalidate(1))
    assert env.raw.get(f.key(1)) is None
    assert cache._core.local.get(f.key(1)) is MISSING
    assert mode.call(f, 1) == [1, 2]
    assert mode.run(f.refresh(1)) == [1, 3]
    assert mode.call(f, 1) == [1, 3]
    cache._core.local.clear()
    assert mode.call(f, 1) == [1, 3]
    assert calls == [1, 1, 1]


def test_unencodable_result_is_returned_not_cached(mode: Any, env: Env) -> None:
    cache = env.cache()
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls, lambda x: object()))
    assert mode.call(f, 1) is not None
    assert mode.call(f, 1) is not None
    assert calls == [1, 1]
    assert cache.stats().not_cached == 2
    assert env.raw.get(f.key(1)) is None


# -- L1 only --------------------------------------------------------------------------------------


def test_l1_only_cache(mode: Any) -> None:
    clock = Clock(5000.0, frozen=True)
    cache = TieredCache(namespace="l1only", clock=clock, ttl=100, l1_ttl=10)
    api = mode.api(cache)
    calls: list[Any] = []
    f = tiered(cache)(counting(mode, calls))
    assert mode.call(f, 1) == [1]
    assert mode.call(f, 1) == [1]
    assert calls == [1]
    clock.advance(10)
    assert mode.call(f, 1) == [1]
    assert calls == [1, 1]
    mode.run(f.invalidate(1))
    assert mode.call(f, 1) == [1]
    assert calls == [1, 1, 1]

    mode.run(api.set("greeting", "hello"))
    assert mode.run(api.get("greeting")) == "hello"
    mode.run(api.delete("greeting"))
    assert mode.run(api.get("greeting", "gone")) == "gone"
    assert cache.stats().backend_errors == 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"l1_ttl": -1}, "l1_ttl"),
        ({"l1_maxsize": -1}, "l1_maxsize"),
        ({"l1_maxsize": 1.5}, "l1_maxsize"),
        ({"l1_maxbytes": 0}, "l1_maxbytes"),
        ({"l1_maxbytes": 1.5}, "l1_maxbytes"),
        ({"pool_size": 0}, "pool_size"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"pool_timeout": -1}, "pool_timeout"),
        ({"staleness_bound": 0}, "staleness_bound"),
        ({"ack_timeout": -1}, "ack_timeout"),
        ({"compression": "lz4"}, "compression"),
        ({"compress_threshold": -1}, "compress_threshold"),
        ({"max_value_bytes": 0}, "max_value_bytes"),
        ({"signing_key": b"short"}, "signing_key"),
        ({"serializer": object()}, "serializer"),
        ({"namespace": "no spaces"}, "namespace"),
        ({"url": "redis://x", "client": fakeredis.FakeRedis()}, "client"),
        ({"url": "notaurl://x"}, "url"),
        ({"async_client": fakeredis.FakeAsyncRedis()}, "async_client"),
        ({"client": object()}, "client"),
        ({"client": fakeredis.FakeRedis(decode_responses=True)}, "decode_responses"),
    ],
)
def test_invalid_config_is_config_error_naming_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        TieredCache(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"ttl": 0}, "ttl"), ({"l1_ttl": -1}, "l1_ttl"), ({"key": "notcallable"}, "key")],
)
def test_invalid_tiered_arguments(kwargs: dict[str, Any], name: str) -> None:
    cache = TieredCache(namespace="cfg")
    with pytest.raises(ConfigError, match=name):
        tiered(cache, **kwargs)


def test_tiered_needs_a_cache_and_a_function() -> None:
    with pytest.raises(ConfigError, match="TieredCache"):
        tiered(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        tiered(TieredCache(namespace="cfg"))(42)  # type: ignore[call-overload]


def test_context_managers() -> None:
    server = fakeredis.FakeServer()
    with TieredCache(client=fakeredis.FakeRedis(server=server), namespace="cm") as cache:
        cache.set("a", 1)
        assert cache.get("a") == 1
    assert cache.stats().bus_connected is False  # the subscriber stopped with the cache
