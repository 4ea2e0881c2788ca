"""Cache keys: canonical encoding, the KeyMaker memo, methods, custom keys and namespaces."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import itertools
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from tiercache import ConfigError, KeyEncodingError, TieredCache, tiered
from tiercache._keys import FORMAT_VERSION, KeyMaker, canonical_bytes, digest, function_prefix, user_key

NAN = float("nan")


@pytest.fixture
def cache() -> TieredCache:
    """An L1-only cache: key derivation never touches Redis."""
    return TieredCache(namespace="keys")


@pytest.fixture
def fake_cache() -> Iterator[TieredCache]:
    server = fakeredis.FakeServer()
    cache = TieredCache(client=fakeredis.FakeRedis(server=server), namespace="keys")
    assert cache.ready()  # L1 takes entries once the invalidation subscriber is subscribed
    yield cache
    cache.close()


def one(x: Any) -> Any:
    return x


def with_default(x: Any, y: int = 7) -> Any:
    return (x, y)


def key_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The digest part of the key a fresh KeyMaker (no memo history) derives for one call."""
    return tail(KeyMaker(fn, "p:")(args, kwargs))


def tail(key: str) -> str:
    return key[key.rindex("{") :]


# -- the shape of keys -----------------------------------------------------------------------


def test_function_key_shape(cache: TieredCache) -> None:
    f = tiered(cache)(one)
    key = f.key(1)
    prefix = f"tc:keys:{FORMAT_VERSION}:f:{one.__module__}.{one.__qualname__}:"
    assert key.startswith(prefix)
    hex_part = key[len(prefix) :]
    assert hex_part.startswith("{") and hex_part.endswith("}")
    assert len(hex_part) == 34
    int(hex_part[1:-1], 16)


def test_golden_keys_are_stable() -> None:
    """Keys written by one release must be read by the next: these digests are frozen."""
    assert digest(b"") == "99aa06d3014798d86001c324468d497f"
    assert canonical_bytes([1, "a", b"b", None, True, 1.5, (2,), {"k": frozenset({3})}]) == (
        b"[8:i1;s1:ab1:bNTf?\xf8\x00\x00\x00\x00\x00\x00(1:i2;{1:s1:k>1:i3;"
    )
    maker = KeyMaker(one, function_prefix("ns", "golden"))
    assert maker((1,), {}) == "tc:ns:v1:f:golden:{" + digest(b"s1:xi1;") + "}"


# -- which calls share a key -----------------------------------------------------------------


def test_positional_keyword_and_default_share_a_key(cache: TieredCache) -> None:
    f = tiered(cache)(with_default)
    k = f.key(1)
    assert f.key(x=1) == k
    assert f.key(1, 7) == k
    assert f.key(1, y=7) == k
    assert f.key(y=7, x=1) == k
    assert f.key(1, 8) != k


@pytest.mark.parametrize("maker", ["memo", "fresh"])
def test_distinct_scalar_types_get_distinct_keys(cache: TieredCache, maker: str) -> None:
    values = [1, "1", 1.0, True, (1,), [1], b"1", None, {1}, frozenset({1}), {1: 1}, bytearray(b"1")]
    f = tiered(cache)(one)
    keys = [f.key(v) if maker == "memo" else key_of(one, v) for v in values]
    assert len(set(keys)) == len(values), list(zip(values, keys, strict=True))


def test_zero_like_values_are_distinct_except_signed_zero() -> None:
    values = [0, False, 0.0, "", b"", (), [], None, "0", {}]
    keys = [key_of(one, v) for v in values]
    assert len(set(keys)) == len(values)
    assert key_of(one, -0.0) == key_of(one, 0.0)
    assert key_of(one, (-0.0, [-0.0])) == key_of(one, (0.0, [0.0]))
    assert key_of(one, {"a": -0.0}) == key_of(one, {"a": 0.0})


def test_nan_equals_nan_in_keys() -> None:
    assert key_of(one, NAN) == key_of(one, float("nan"))
    assert key_of(one, struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x00\x01")[0]) == key_of(one, NAN)
    assert key_of(one, NAN) != key_of(one, float("inf"))
    assert key_of(one, float("inf")) != key_of(one, float("-inf"))


def test_nan_encoding_is_not_a_prefix_of_a_float_encoding() -> None:
    """The float whose 8 big-endian bytes begin with b'nan' must not be confused with NaN.

    [x, 12] and [nan, 'abi12;'] are different argument values; they must not share a key.
    """
    x = struct.unpack(">d", b"nans6:ab")[0]
    assert x == x and x != float("inf")  # an ordinary finite float  # noqa: PLR0124
    a = [x, 12]
    b = [NAN, "abi12;"]
    assert canonical_bytes(a) != canonical_bytes(b)
    assert key_of(one, a) != key_of(one, b)


def test_dict_order_does_not_matter() -> None:
    a = {"a": 1, "b": [1, 2], 3: None, (1, "x"): b"z"}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b)
    assert key_of(one, a) == key_of(one, b)
    assert key_of(one, {"a": 1, "b": 2}) != key_of(one, {"a": 2, "b": 1})
    assert key_of(one, {"a": 1}) != key_of(one, {"a": True})
    assert key_of(one, {1: "a"}) != key_of(one, {True: "a"})


def test_set_order_does_not_matter() -> None:
    words = [f"w{i}" for i in range(200)]
    a = set(words)
    b = set(reversed(words))
    b.update(f"extra{i}" for i in range(100))
    for i in range(100):
        b.discard(f"extra{i}")
    assert a == b
    assert key_of(one, a) == key_of(one, b)
    assert key_of(one, frozenset(a)) == key_of(one, frozenset(reversed(words)))
    assert key_of(one, a) != key_of(one, frozenset(a))
    assert key_of(one, {1, 2}) != key_of(one, {1, 3})


def test_nesting_and_length_are_encoded() -> None:
    assert key_of(one, [[1], 2]) != key_of(one, [[1, 2]])
    assert key_of(one, ("ab", "c")) != key_of(one, ("a", "bc"))
    assert key_of(one, [b"ab", b"c"]) != key_of(one, [b"a", b"bc"])
    assert key_of(one, ((),)) != key_of(one, ())
    assert key_of(one, [1, [2, [3]]]) != key_of(one, [1, [2, 3]])


def test_large_ints_are_distinct_and_encodable() -> None:
    big = 2**20000  # more digits than int->str conversion allows by default
    assert key_of(one, big) != key_of(one, big + 1)
    assert key_of(one, -big) != key_of(one, big)
    assert key_of(one, 2**64) != key_of(one, 2**64 + 1)


def test_rich_types_have_keys() -> None:
    class Color(enum.Enum):
        RED = 1
        ONE = "1"

    values = [
        dt.datetime(2024, 1, 2, 3, 4, 5),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        dt.date(2024, 1, 2),
        dt.time(3, 4, 5),
        dt.timedelta(days=1, seconds=2),
        decimal.Decimal("1.5"),
        uuid.UUID(int=1),
        Color.RED,
        Color.ONE,
        int,
        str,
    ]
    keys = {key_of(one, v) for v in values}
    assert len(keys) == len(values)
    assert key_of(one, Color.RED) != key_of(one, 1)
    assert key_of(one, dt.date(2024, 1, 2)) == key_of(one, dt.date(2024, 1, 2))


def test_dataclass_and_pydantic_keys() -> None:
    import pydantic

    @dataclasses.dataclass
    class P:
        a: int
        b: str

    class M(pydantic.BaseModel):
        a: int
        b: str

    assert key_of(one, P(1, "x")) == key_of(one, P(1, "x"))
    assert key_of(one, P(1, "x")) != key_of(one, P(2, "x"))
    assert key_of(one, M(a=1, b="x")) == key_of(one, M(a=1, b="x"))
    assert key_of(one, M(a=1, b="x")) != key_of(one, M(a=1, b="y"))
    assert key_of(one, M(a=1, b="x")) != key_of(one, P(1, "x"))


def test_builtin_subclass_is_distinct_from_builtin() -> None:
    class Name(str):
        pass

    assert key_of(one, Name("a")) != key_of(one, "a")
    assert key_of(one, Name("a")) == key_of(one, Name("a"))


# -- the memo --------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations([1, True, 1.0])))
def test_memo_never_confuses_int_bool_float(order: tuple[Any, ...]) -> None:
    cache = TieredCache(namespace="memo")
    calls: list[Any] = []

    @tiered(cache)
    def kind(x: Any) -> str:
        calls.append(x)
        return type(x).__name__

    for _ in range(2):
        for v in order:
            assert kind(v) == type(v).__name__
            assert tail(kind.key(v)) == key_of(kind.__wrapped__, v)
    assert len(calls) == 3
    assert len({kind.key(v) for v in order}) == 3


@pytest.mark.parametrize("order", list(itertools.permutations([0, False, 0.0, -0.0])))
def test_memo_with_zeros_keyword_calls(order: tuple[Any, ...]) -> None:
    cache = TieredCache(namespace="memo")

    @tiered(cache)
    def kind(x: Any) -> str:
        return type(x).__name__

    for v in order:
        assert kind(x=v) == type(v).__name__
        assert kind(v) == type(v).__name__
    keys = {type(v): kind.key(v) for v in order}
    assert len(set(keys.values())) == 3
    assert kind.key(x=0.0) == kind.key(-0.0)


def test_memo_matches_full_derivation_for_many_calls(cache: TieredCache) -> None:
    f = tiered(cache)(with_default)
    values: list[Any] = [1, True, 1.0, "1", b"1", None, 2**70, -0.0, 0.0, NAN, 0, False]
    for v in values + values:
        assert tail(f.key(v)) == key_of(with_default, v)
        assert tail(f.key(v, 3)) == key_of(with_default, v, 3)
        assert tail(f.key(x=v, y=3)) == key_of(with_default, v, 3)


# -- errors ----------------------------------------------------------------------------------


def test_unencodable_argument_names_parameter_and_path(cache: TieredCache) -> None:
    @tiered(cache)
    def load(user: Any, limit: int = 1) -> Any:
        return user

    with pytest.raises(KeyEncodingError) as info:
        load({"tags": ["a", "b", object()]})
    msg = str(info.value)
    assert "'user'" in msg
    assert "['tags'][2]" in msg
    assert "object" in msg
    assert isinstance(info.value, TypeError)

    with pytest.raises(KeyEncodingError, match="'limit'"):
        load.key("u", limit=object())
    with pytest.raises(TypeError):
        load.key([lambda: 1])


def test_unencodable_argument_does_not_call_function(cache: TieredCache) -> None:
    calls = []

    @tiered(cache)
    def f(x: Any) -> Any:
        calls.append(x)
        return 1

    with pytest.raises(KeyEncodingError):
        f(object())
    assert calls == []


def test_wrong_arguments_raise_type_error(cache: TieredCache) -> None:
    f = tiered(cache)(one)
    with pytest.raises(TypeError, match="one"):
        f.key(1, 2)
    with pytest.raises(TypeError):
        f.key(z=1)


# -- __tiercache_key__ -----------------------------------------------------------------------


class Account:
    def __init__(self, account_id: int, cache_noise: object = None) -> None:
        self.account_id = account_id
        self.cache_noise = cache_noise if cache_noise is not None else object()

    def __tiercache_key__(self) -> Any:
        return ("account", self.account_id)


class Unkeyed:
    pass


def test_tiercache_key_hook() -> None:
    assert key_of(one, Account(1)) == key_of(one, Account(1))
    assert key_of(one, Account(1)) != key_of(one, Account(2))
    assert key_of(one, Account(1)) != key_of(one, ("account", 1))
    assert key_of(one, [Account(1)]) == key_of(one, [Account(1)])
    with pytest.raises(KeyEncodingError):
        key_of(one, Unkeyed())


# -- methods, staticmethod, classmethod ------------------------------------------------------


def test_method_leaves_self_out_of_key(fake_cache: TieredCache) -> None:
    calls: list[Any] = []

    class Repo:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @tiered(fake_cache)
        def find(self, x: int) -> list[Any]:
            calls.append((self.tag, x))
            return [self.tag, x]

    a, b = Repo("a"), Repo("b")
    assert a.find.key(1) == b.find.key(1)
    assert a.find.key(1) != a.find.key(2)
    assert a.find(1) == ["a", 1]
    assert b.find(1) == ["a", 1]  # every instance shares the entry
    assert calls == [("a", 1)]
    assert Repo.find(b, 1) == ["a", 1]
    assert a.find.key(x=1) == a.find.key(1)


def test_method_includes_self_when_class_defines_hook(fake_cache: TieredCache) -> None:
    calls: list[Any] = []

    class Repo:
        def __init__(self, shard: int) -> None:
            self.shard = shard

        def __tiercache_key__(self) -> int:
            return self.shard

        @tiered(fake_cache)
        def find(self, x: int) -> list[int]:
            calls.append((self.shard, x))
            return [self.shard, x]

    assert Repo(1).find.key(5) != Repo(2).find.key(5)
    assert Repo(1).find.key(5) == Repo(1).find.key(5)
    assert Repo(1).find(5) == [1, 5]
    assert Repo(2).find(5) == [2, 5]
    assert Repo(1).find(5) == [1, 5]
    assert calls == [(1, 5), (2, 5)]
    Repo(1).find.invalidate(5)
    assert Repo(1).find(5) == [1, 5]
    assert calls == [(1, 5), (2, 5), (1, 5)]


def test_staticmethod_with_tiered_outer(fake_cache: TieredCache) -> None:
    calls: list[int] = []

    class Svc:
        @tiered(fake_cache)
        @staticmethod
        def double(x: int) -> int:
            calls.append(x)
            return 2 * x

    assert Svc.double(3) == 6
    assert Svc().double(3) == 6
    assert Svc.double(4) == 8
    assert calls == [3, 4]
    assert Svc.double.key(3) == Svc().double.key(x=3)


def test_classmethod_with_tiered_outer(fake_cache: TieredCache) -> None:
    calls: list[Any] = []

    class Svc:
        @tiered(fake_cache)
        @classmethod
        def make(cls, x: int) -> list[Any]:
            calls.append((cls.__name__, x))
            return [cls.__name__, x]

    class Sub(Svc):
        pass

    assert Svc.make(1) == ["Svc", 1]
    assert Svc().make(1) == ["Svc", 1]
    assert Sub.make(1) == ["Sub", 1]  # cls is part of the key
    assert calls == [("Svc", 1), ("Sub", 1)]


# -- custom key= and name= -------------------------------------------------------------------


def test_custom_str_key_is_a_user_key(fake_cache: TieredCache) -> None:
    calls: list[int] = []

    @tiered(fake_cache, key=lambda user_id: f"user:{user_id}")
    def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    assert get_user.key(1) == fake_cache.key("user:1") == user_key("keys", "user:1")
    assert get_user(1) == {"id": 1}
    assert fake_cache.get("user:1") == {"id": 1}
    fake_cache.set("user:2", {"id": 22})
    assert get_user(2) == {"id": 22}
    assert calls == [1]
    fake_cache.delete("user:1")
    assert get_user(1) == {"id": 1}
    assert calls == [1, 1]


def test_custom_non_str_key_is_digested(cache: TieredCache) -> None:
    @tiered(cache, key=lambda a, b: (a, b))
    def f(a: int, b: int) -> int:
        return a + b

    assert f.key(1, 2) == f.key(1, b=2)
    assert f.key(1, 2) != f.key(2, 1)
    assert f.key(1, 2).startswith(f"tc:keys:{FORMAT_VERSION}:f:")


def test_name_override(cache: TieredCache) -> None:
    def first(x: int) -> str:
        return "first"

    def second(x: int) -> str:
        return "second"

    f = tiered(cache, name="shared.fn")(first)
    g = tiered(cache, name="shared.fn")(second)
    h = tiered(cache)(second)
    assert f.key(1).startswith(f"tc:keys:{FORMAT_VERSION}:f:shared.fn:")
    assert f.key(1) == g.key(1)
    assert h.key(1) != g.key(1)
    assert f(1) == "first"
    assert g(1) == "first"  # same key: served from L1


@pytest.mark.parametrize("name", ["a{b", "a}b", "{x}"])
def test_name_with_braces_is_config_error(cache: TieredCache, name: str) -> None:
    with pytest.raises(ConfigError, match="name="):
        tiered(cache, name=name)(one)


# -- user keys and namespaces ----------------------------------------------------------------


def test_user_keys() -> None:
    assert user_key("ns", "a") == f"tc:ns:{FORMAT_VERSION}:k:{{a}}"
    braced = user_key("ns", "a{b}")
    assert braced.count("{") == 1 and braced.count("}") == 1
    assert braced != user_key("ns", "a{c}")
    assert user_key("ns", "a") != user_key("other", "a")
    for bad in ["", None, 1, b"a"]:
        with pytest.raises(KeyEncodingError):
            user_key("ns", bad)  # type: ignore[arg-type]


def test_braced_user_keys_work_through_the_cache(fake_cache: TieredCache) -> None:
    fake_cache.set("a{b}", 1)
    fake_cache.set("a{c}", 2)
    fake_cache._core.local.clear()
    assert fake_cache.get("a{b}") == 1
    assert fake_cache.get("a{c}") == 2


@pytest.mark.parametrize("namespace", ["", "a b", "a/b", "a{b}", "x" * 65, ":a", "a:", "a::b", "ü", 5, None])
def test_invalid_namespace_is_config_error(namespace: Any) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        TieredCache(namespace=namespace)


@pytest.mark.parametrize("namespace", ["a", "my-app.v2", "a:b:c", "x" * 64, "A_9"])
def test_valid_namespaces(namespace: str) -> None:
    cache = TieredCache(namespace=namespace)
    assert cache.key("k").startswith(f"tc:{namespace}:")
