"""The read and write paths against a real redis-server, through the sync and the async driver."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import enum
import uuid
import zlib
from typing import Any

import pytest

from tests.support import ready
from tiercache import TieredCache, tiered

pytestmark = pytest.mark.redis

MAGIC = 0xC7


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    tags: tuple[str, ...] = ()


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**64 + 7,  # beyond msgpack's native ints
    -(10**30),
    3.5,
    -0.0,
    float("inf"),
    "",
    "héllo wörld ✓ 🎉",
    b"",
    b"\x00\xffbinary\x00",
    [1, "two", 3.0, None],
    (1, (2, (3, "x")), []),
    {"a": 1, "b": [1, 2], "c": {"d": None}},
    {1: "int key", (1, 2): "tuple key", None: "none key"},
    {1, 2, 3},
    frozenset({"a", "b"}),
    dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.datetime(2000, 1, 1, 0, 0),
    dt.date(1999, 12, 31),
    dt.time(12, 34, 56, 789),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    decimal.Decimal("3.14159265358979323846264338327950288"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Point(1, 2.5, ("a", "b")),
    Color.BLUE,
    [Point(0, 0.0), {"nested": Color.RED}],
]


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, recursively for containers."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, float) and a == 0.0:
        return str(a) == str(b)  # -0.0 stays -0.0
    return bool(a == b)


def test_miss_calls_once_and_stores_with_tiered_ttl(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(ttl=300)
    calls = []

    def load(user_id: int, *, verbose: bool = False) -> dict[str, Any]:
        calls.append(user_id)
        return {"id": user_id, "name": f"user{user_id}", "verbose": verbose}

    f = tiered(cache, ttl=7)(mode.fn(load))
    assert mode.call(f, 42) == {"id": 42, "name": "user42", "verbose": False}
    assert mode.call(f, 42) == {"id": 42, "name": "user42", "verbose": False}
    assert calls == [42]

    key = f.key(42)
    assert key.startswith(f"tc:{cache.namespace}:")
    data = raw.get(key)
    assert data is not None, "the computed value was not written to Redis"
    assert data[0] == MAGIC
    assert cache._core.codec.decode(key, data) == {"id": 42, "name": "user42", "verbose": False}
    pttl = raw.pttl(key)
    assert 5_000 < pttl <= 7_000, f"PTTL {pttl} ms does not come from tiered(ttl=7)"
    stats = cache.stats()
    assert stats.misses == 1
    assert stats.loads == 1
    assert stats.l1_hits == 1
    assert stats.backend_errors == 0


def test_keyword_and_positional_calls_share_one_redis_entry(redis_server: Any, namespace: str, raw: Any) -> None:
    cache = ready(TieredCache(redis_server.url, namespace=namespace))
    calls: list[tuple[int, bool]] = []

    @tiered(cache)
    def load(user_id: int, *, verbose: bool = False) -> list[Any]:
        calls.append((user_id, verbose))
        return [user_id, verbose]

    @tiered(cache)
    async def aload(user_id: int, *, verbose: bool = False) -> list[Any]:
        calls.append((-user_id, verbose))
        return [-user_id, verbose]

    async def async_calls() -> list[Any]:
        try:
            return [await aload(7), await aload(user_id=7), await aload(7, verbose=False), await aload(7, verbose=True)]
        finally:
            await cache.aclose()

    try:
        assert [load(7), load(user_id=7), load(7, verbose=False)] == [[7, False]] * 3
        assert load.key(7) == load.key(user_id=7) == load.key(7, verbose=False) != load.key(7, verbose=True)
        assert asyncio.run(async_calls()) == [[-7, False]] * 3 + [[-7, True]]
        assert calls == [(7, False), (-7, False), (-7, True)]
        assert raw.exists(load.key(7), aload.key(7), aload.key(7, verbose=True)) == 3
    finally:
        cache.close()


def test_ttl_defaults_to_the_cache_ttl(mode: Any, make_cache: Any, raw: Any) -> None:
    cache = make_cache(ttl=42)
    f = tiered(cache, name="plus-one")(mode.fn(lambda x: x + 1))
    assert mode.call(f, 1) == 2
    pttl = raw.pttl(f.key(1))
    assert 40_000 < pttl <= 42_000, f"PTTL {pttl} ms does not come from TieredCache(ttl=42)"

    api = mode.api(cache)
    mode.run(api.set("explicit", [1, 2]))
    pttl = raw.pttl(cache.key("explicit"))
    assert 40_000 < pttl <= 42_000
    mode.run(api.set("explicit-ttl", [1, 2], ttl=3))
    pttl = raw.pttl(cache.key("explicit-ttl"))
    assert 1_000 < pttl <= 3_000


def test_l2_hit_in_another_cache_instance(mode: Any, make_cache: Any, raw: Any) -> None:
    a, b = make_cache(), make_cache()
    calls_a: list[int] = []
    calls_b: list[int] = []

    def compute_a(n: int) -> list[int]:
        calls_a.append(n)
        return [n, n * n]

    def compute_b(n: int) -> list[int]:
        calls_b.append(n)
        return [-1]

    # The same name, as two processes running the same code would have.
    fa = tiered(a, name="squares")(mode.fn(compute_a))
    fb = tiered(b, name="squares")(mode.fn(compute_b))
    assert fa.key(3) == fb.key(3)
    assert mode.call(fa, 3) == [3, 9]
    assert raw.exists(fa.key(3)) == 1
    assert mode.call(fb, 3) == [3, 9]
    assert mode.call(fb, 3) == [3, 9]
    assert calls_a == [3]
    assert calls_b == []
    sb = b.stats()
    assert (sb.l2_hits, sb.misses, sb.loads, sb.l1_hits) == (1, 0, 0, 1)
    # The L2 hit is in b's L1 now, bounded by what Redis had left.
    left = b._core.local.ttl_left(fb.key(3))
    assert left is not None
    assert 0 < left <= 60

    # The user-key API sees the same entries across instances.
    mode.run(mode.api(a).set("shared", {"v": 1}))
    assert mode.run(mode.api(b).get("shared")) == {"v": 1}
    assert mode.run(mode.api(b).get("absent", "dflt")) == "dflt"


def test_invalidate_removes_the_entry_from_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    a, b = make_cache(), make_cache()
    calls: list[str] = []

    def load(name: str) -> str:
        calls.append(name)
        return name.upper() + str(len(calls))

    fa = tiered(a, name="upper")(mode.fn(load))
    fb = tiered(b, name="upper")(mode.fn(load))
    assert mode.call(fa, "x") == "X1"
    assert mode.call(fa, "y") == "Y2"
    key = fa.key("x")
    assert raw.exists(key) == 1

    mode.call(fa.invalidate, "x")
    assert raw.exists(key) == 0, "invalidate() left the entry in Redis"
    assert raw.exists(fa.key("y")) == 1, "invalidate() removed another call's entry"
    # Not served from a's L1 either: recomputed, and written back.
    assert mode.call(fa, "x") == "X3"
    assert raw.exists(key) == 1
    # Another instance that never held it reads the new value from Redis.
    assert mode.call(fb, "x") == "X3"
    assert calls == ["x", "y", "x"]

    # Invalidating from the other instance removes it from Redis too.
    mode.call(fb.invalidate, "x")
    assert raw.exists(key) == 0
    mode.run(mode.api(a).delete("never-set", "also-never"))  # deleting absent keys is fine

    mode.run(mode.api(a).set("k", 1))
    assert raw.exists(a.key("k")) == 1
    mode.run(mode.api(b).delete("k"))
    assert raw.exists(a.key("k")) == 0
    assert mode.run(mode.api(b).get("k", "gone")) == "gone"


def test_refresh_recomputes_and_overwrites(mode: Any, make_cache: Any, raw: Any) -> None:
    a, b = make_cache(), make_cache()
    version = [0]

    def load(x: int) -> tuple[int, int]:
        version[0] += 1
        return (x, version[0])

    fa = tiered(a, name="versioned", ttl=20)(mode.fn(load))
    fb = tiered(b, name="versioned", ttl=20)(mode.fn(load))
    assert mode.call(fa, 1) == (1, 1)
    key = fa.key(1)
    raw.pexpire(key, 5_000)  # so the rewrite's fresh TTL is visible

    assert mode.call(fa.refresh, 1) == (1, 2)
    assert version[0] == 2
    assert a._core.codec.decode(key, raw.get(key)) == (1, 2), "refresh() did not overwrite Redis"
    assert 18_000 < raw.pttl(key) <= 20_000, "refresh() did not write with the function's ttl"
    assert mode.call(fa, 1) == (1, 2)  # L1 holds the refreshed value
    assert mode.call(fb, 1) == (1, 2)  # another instance reads it from Redis
    assert version[0] == 2

    # refresh of a call that was never cached computes and stores it.
    assert mode.call(fb.refresh, 2) == (2, 3)
    assert mode.call(fa, 2) == (2, 3)
    assert version[0] == 3


def test_a_failed_load_does_not_keep_the_key_out_of_redis(mode: Any, make_cache: Any, raw: Any) -> None:
    """The function raises once (its caller gets the exception); the next successful load is
    stored in Redis as usual, and another instance reads it from there."""
    a, b = make_cache(), make_cache()
    attempts: list[int] = []

    def flaky(x: int) -> list[int]:
        attempts.append(x)
        if len(attempts) == 1:
            raise ValueError("transient failure")
        return [x]

    fa = tiered(a, name="flaky")(mode.fn(flaky))
    fb = tiered(b, name="flaky")(mode.fn(lambda x: pytest.fail("b computed it: not stored in Redis")))
    with pytest.raises(ValueError, match="transient"):
        mode.call(fa, 1)
    assert a.stats().load_errors == 1
    assert mode.call(fa, 1) == [1]
    assert raw.exists(fa.key(1)) == 1, (
        f"the successful load after a failed one was not stored in Redis (keys there: {raw.keys(fa.key(1) + '*')})"
    )
    assert mode.call(fb, 1) == [1]


def test_a_load_in_flight_while_the_subscriber_subscribes_is_stored(
    mode: Any, own_redis: Any, own_raw: Any, make_cache: Any, namespace: str
) -> None:
    """A call made right after the cache is created, while its invalidation subscriber is still
    subscribing (here: held up by CLIENT PAUSE, so the order is certain), is still stored in
    Redis; and its lease does not keep other instances from storing the key."""
    own_raw.execute_command("CLIENT", "PAUSE", "300", "ALL")
    cache = TieredCache(own_redis.url, namespace=namespace, socket_timeout=3, connect_timeout=3)
    try:
        calls: list[int] = []

        def load(x: int) -> list[int]:
            calls.append(x)
            assert cache.ready(5), "never subscribed"  # a load that outlasts the subscription
            return [x, x]

        f = tiered(cache, name="early")(mode.fn(load))
        assert mode.call(f, 1) == [1, 1]
        assert own_raw.exists(f.key(1)) == 1, (
            f"not stored in Redis (keys there: {own_raw.keys(f.key(1) + '*')}, lease PTTL "
            f"{own_raw.pttl(f.key(1) + ':lease')} ms)"
        )
    finally:
        if mode.is_async:
            mode.run(cache.aclose())
        cache.close()
    other = make_cache(url=own_redis.url)
    g = tiered(other, name="early")(mode.fn(lambda x: [x, "other"]))
    assert mode.call(g, 1) == [1, 1]
    assert own_raw.exists(g.key(1)) == 1


@pytest.mark.parametrize("serializer", ["msgpack", "pickle"])
def test_values_of_many_types_round_trip_through_redis(mode: Any, make_cache: Any, raw: Any, serializer: str) -> None:
    if serializer == "pickle":
        from tiercache import PickleSerializer

        key = b"0123456789abcdef0123456789abcdef"
        a = make_cache(serializer=PickleSerializer(), signing_key=key)
        b = make_cache(serializer=PickleSerializer(), signing_key=key)
    else:
        a, b = make_cache(), make_cache()
        b.serializer.register(Point, Color)  # b never encoded one: it must be told
    computed: list[int] = []

    def value_a(i: int) -> Any:
        computed.append(i)
        return VALUES[i]

    def value_b(i: int) -> Any:
        raise AssertionError(f"b computed VALUES[{i}]: not an L2 hit")

    fa = tiered(a, name="values")(mode.fn(value_a))
    fb = tiered(b, name="values")(mode.fn(value_b))
    for i, expected in enumerate(VALUES):
        assert same(mode.call(fa, i), expected), f"VALUES[{i}] changed on the way out: {expected!r}"
        assert raw.exists(fa.key(i)) == 1, f"VALUES[{i}] ({expected!r}) was not cached in Redis"
    for i, expected in enumerate(VALUES):
        got = mode.call(fb, i)
        assert same(got, expected), f"VALUES[{i}] round trip: {expected!r} came back as {got!r}"
    assert computed == list(range(len(VALUES)))
    assert b.stats().l2_hits == len(VALUES)
    assert a.stats().not_cached == b.stats().codec_errors == 0


@pytest.mark.parametrize(
    ("compression", "flag"),
    [("auto", 2), ("zstd", 2), ("zlib", 1), (None, 0)],
)
def test_large_values_are_compressed_in_redis(
    mode: Any, make_cache: Any, raw: Any, compression: str | None, flag: int
) -> None:
    import zstandard

    a = make_cache(compression=compression, compress_threshold=1024)
    b = make_cache(compression=compression, compress_threshold=1024)
    big = {"rows": [{"id": i, "text": "lorem ipsum dolor sit amet " * 3} for i in range(400)]}
    small = {"rows": [1, 2, 3]}

    def load(kind: str) -> Any:
        return big if kind == "big" else small

    fa = tiered(a, name="blob")(mode.fn(load))
    fb = tiered(b, name="blob")(mode.fn(lambda kind: pytest.fail("b computed")))
    assert mode.call(fa, "big") == big
    assert mode.call(fa, "small") == small
    data = raw.get(fa.key("big"))
    assert data[:3] == bytes((MAGIC, 1, 1))
    assert data[3] & 0b11 == flag, f"compression flag {data[3] & 0b11}, expected {flag} for {compression!r}"
    plain = len(a.serializer.dumps(big))
    if flag:
        assert len(data) < plain / 5, "a repetitive value was stored (almost) uncompressed"
    if flag == 1:
        assert a.serializer.loads(zlib.decompress(data[4:])) == big
    if flag == 2:
        import zstandard

        assert a.serializer.loads(zstandard.ZstdDecompressor().decompress(data[4:])) == big
    small_data = raw.get(fa.key("small"))
    assert small_data[3] & 0b11 == 0, "a value under compress_threshold was compressed"
    assert mode.call(fb, "big") == big
    assert mode.call(fb, "small") == small
