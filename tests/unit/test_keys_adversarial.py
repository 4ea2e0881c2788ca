"""Keys under hostile input (issue 9, items 1, 2, 3, 10, 12, 13): subclasses that lie about
their value, pydantic fields that model_dump() hides, functions that share a qualified name,
memos that keep big arguments alive, text Redis cannot hold, and arguments too deep to encode."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import functools
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pydantic
import pytest

from tiercache import ConfigError, KeyEncodingError, TieredCache, json_key, llm_key, tiered, tiered_batch
from tiercache._keys import KeyMaker, canonical_bytes, scoped_key, user_key, version_key

MAX_DEPTH = 100  # the nesting docs/keys-and-values.md promises to encode
SURROGATE = "report-\udcff.csv"  # what os.fsdecode makes of the byte 0xff


@pytest.fixture
def cache() -> TieredCache:
    """An L1-only cache: key derivation never touches Redis."""
    return TieredCache(namespace="adv")


@pytest.fixture
def strict_cache() -> Iterator[TieredCache]:
    server = fakeredis.FakeServer()
    cache = TieredCache(client=fakeredis.FakeRedis(server=server), namespace="adv", strict=True, tenants=True)
    assert cache.ready()
    yield cache
    cache.close()


def key_of(*args: Any) -> str:
    def f(x: Any) -> Any:
        return x

    return KeyMaker(f, "p:")(args, {})


# -- item 1: a builtin subclass never chooses its own key ------------------------------------


class Password(str):
    def __str__(self) -> str:
        return "********"

    def __repr__(self) -> str:
        return "Password(********)"

    def __format__(self, spec: str) -> str:
        return "********"

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        return b"********"

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


class Masked(int):
    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0

    def __str__(self) -> str:
        return "0"

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


class Rounded(float):
    def __float__(self) -> float:
        return 0.0

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


class Blob(bytes):
    def __bytes__(self) -> bytes:
        return b""

    def __getitem__(self, item: Any) -> Any:
        return b""

    def __len__(self) -> int:
        return 0


class FirstOnly(tuple):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return iter(tuple.__getitem__(self, slice(0, 1)))

    def __getitem__(self, item: Any) -> Any:
        return 0

    def __len__(self) -> int:
        return 1


class FirstOnlyList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return iter([list.__getitem__(self, 0)])

    def __getitem__(self, item: Any) -> Any:
        return [0]

    def __len__(self) -> int:
        return 1


class Redacted(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return [("user", "?")]

    def keys(self) -> Any:
        return ["user"]

    def values(self) -> Any:
        return ["?"]

    def __iter__(self) -> Iterator[Any]:
        return iter(["user"])

    def __getitem__(self, key: Any) -> Any:
        return "?"

    def __len__(self) -> int:
        return 1


class OneSet(frozenset):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return iter([1])

    def __len__(self) -> int:
        return 1


class OneMutableSet(set):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return iter([1])

    def __len__(self) -> int:
        return 1


class Date(dt.date):
    def isoformat(self) -> str:
        return "2000-01-01"


class Money(decimal.Decimal):
    def __str__(self) -> str:
        return "0"


class Id(uuid.UUID):
    @property
    def bytes(self) -> bytes:  # type: ignore[override]
        return b"\0" * 16


class Span(dt.timedelta):
    @property
    def days(self) -> int:  # type: ignore[override]
        return 0


SUBCLASS_PAIRS: list[tuple[Any, Any]] = [
    (Password("letmein"), Password("hunter2")),
    (Masked(1), Masked(2)),
    (Rounded(1.5), Rounded(2.5)),
    (Blob(b"alice"), Blob(b"bob")),
    (FirstOnly((1, "alice")), FirstOnly((1, "bob"))),
    (FirstOnlyList([1, "alice"]), FirstOnlyList([1, "bob"])),
    (Redacted(user="alice"), Redacted(user="bob")),
    (OneSet({1, 2}), OneSet({1, 3})),
    (OneMutableSet({1, 2}), OneMutableSet({1, 3})),
    (Date(2024, 1, 2), Date(2024, 1, 3)),
    (Money("1.5"), Money("2.5")),
    (Id(int=1), Id(int=2)),
    (Span(days=1), Span(days=2)),
]


@pytest.mark.parametrize(("a", "b"), SUBCLASS_PAIRS, ids=lambda v: type(v).__name__)
def test_subclass_is_keyed_by_its_raw_value_not_its_overrides(cache: TieredCache, a: Any, b: Any) -> None:
    assert key_of(a) != key_of(b)
    assert canonical_bytes(a) != canonical_bytes(b)
    calls: list[Any] = []

    @tiered(cache, name=f"login.{type(a).__name__}")
    def login(secret: Any) -> int:
        calls.append(secret)
        return len(calls)

    assert login(a) == 1
    assert login(b) == 2, "b must not get the result cached for a"
    assert login(a) == 1


def test_subclass_keys_are_stable_and_apart_from_the_builtin() -> None:
    assert key_of(Password("x")) == key_of(Password("x"))
    assert key_of(Password("x")) != key_of("x")
    assert key_of(Masked(5)) != key_of(5)
    assert key_of([Password("a")]) != key_of([Password("b")])
    assert key_of({"k": Masked(1)}) != key_of({"k": Masked(2)})


def test_namedtuples_key_by_class_fields_and_values() -> None:
    point = collections.namedtuple("point", "x y")
    pair = collections.namedtuple("pair", "x y")
    other_fields = collections.namedtuple("point", "a b")  # type: ignore[name-match]
    assert key_of(point(1, 2)) == key_of(point(1, 2))
    assert key_of(point(1, 2)) != key_of(point(1, 3))
    assert key_of(point(1, 2)) != key_of(pair(1, 2))
    assert key_of(point(1, 2)) != key_of((1, 2))
    assert key_of(point(1, 2)) != key_of(other_fields(1, 2)), "same class name, other fields"


def test_json_and_llm_keys_read_subclasses_raw() -> None:
    assert json_key({"q": Password("a")}) != json_key({"q": Password("b")})
    assert json_key({"q": Password("a")}) == json_key({"q": "a"})
    assert json_key([Masked(1)]) != json_key([Masked(2)])
    assert llm_key("m", [{"role": "user", "content": Password("a")}]) != llm_key(
        "m", [{"role": "user", "content": Password("b")}]
    )


def test_tenant_and_tag_subclasses_are_named_by_their_raw_value(cache: TieredCache) -> None:
    assert version_key("adv", "tenant", Masked(7)) == version_key("adv", "tenant", 7)
    assert version_key("adv", "tenant", Masked(7)) != version_key("adv", "tenant", Masked(8))
    assert version_key("adv", "tag", Password("a")) != version_key("adv", "tag", Password("b"))
    assert user_key("adv", Password("a")) != user_key("adv", Password("b"))
    base = "tc:adv:v1:f:x:{d}"
    assert scoped_key(base, Password("a"), [1]) != scoped_key(base, Password("b"), [1])


# -- item 2: every pydantic field is part of the key -----------------------------------------


class Query(pydantic.BaseModel):
    text: str
    user_id: int = pydantic.Field(exclude=True)


class Shown(pydantic.BaseModel):
    account: str

    @pydantic.field_serializer("account")
    def _mask(self, value: str) -> str:
        return "***"


class Open(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    text: str


def test_pydantic_excluded_and_serialized_fields_are_keyed(cache: TieredCache) -> None:
    assert key_of(Query(text="q", user_id=1)) != key_of(Query(text="q", user_id=2))
    assert key_of(Query(text="q", user_id=1)) == key_of(Query(text="q", user_id=1))
    assert key_of(Shown(account="alice")) != key_of(Shown(account="bob"))
    assert key_of(Open(text="q", page=1)) != key_of(Open(text="q", page=2))
    assert key_of(Open(text="q")) != key_of(Open(text="q", page=None))

    @tiered(cache, name="search")
    def search(query: Query) -> str:
        return f"results of user {query.user_id}"

    assert search(Query(text="q", user_id=1)) == "results of user 1"
    assert search(Query(text="q", user_id=2)) == "results of user 2", "bob must not get alice's results"


def test_pydantic_models_of_different_classes_differ() -> None:
    class A(pydantic.BaseModel):
        x: int

    class B(pydantic.BaseModel):
        x: int

    assert key_of(A(x=1)) != key_of(B(x=1))
    assert key_of(A(x=1)) != key_of({"x": 1})


# -- item 3: two live functions never share a derived key name --------------------------------


def make_converter(cache: TieredCache, currency: str, *, name: str | None = None) -> Callable[[int], str]:
    @tiered(cache, name=name)
    def convert(amount: int) -> str:
        return f"{amount} {currency}"

    return convert


def test_closures_of_one_factory_are_refused_without_name(cache: TieredCache) -> None:
    to_usd = make_converter(cache, "usd")
    with pytest.raises(ConfigError, match="name="):
        make_converter(cache, "gbp")
    assert to_usd(100) == "100 usd"
    to_gbp = make_converter(cache, "gbp", name="convert.gbp")
    to_eur = make_converter(cache, "eur", name="convert.eur")
    assert (to_usd(100), to_gbp(100), to_eur(100)) == ("100 usd", "100 gbp", "100 eur")


def test_lambdas_need_a_name(cache: TieredCache) -> None:
    with pytest.raises(ConfigError, match="name="):
        tiered(cache)(lambda x: x)
    with pytest.raises(ConfigError, match="name="):
        tiered_batch(cache)(lambda items: items)
    f = tiered(cache, name="double")(lambda x: 2 * x)
    g = tiered(cache, name="triple")(lambda x: 3 * x)
    assert (f(2), g(2)) == (4, 6)


def test_callable_objects_and_partials_of_one_name_are_refused(cache: TieredCache) -> None:
    class Scale:
        def __init__(self, k: int) -> None:
            self.k = k

        def __call__(self, x: int) -> int:
            return self.k * x

    def scale(k: int, x: int) -> int:
        return k * x

    keep = [tiered(cache)(Scale(2)), tiered(cache)(functools.partial(scale, 2))]
    with pytest.raises(ConfigError, match="name="):
        tiered(cache)(Scale(3))
    with pytest.raises(ConfigError, match="name="):
        tiered(cache)(functools.partial(scale, 3))
    assert [f(5) for f in keep] == [10, 10]


def test_methods_of_classes_from_one_factory_are_refused(cache: TieredCache) -> None:
    def make_repo(table: str) -> type:
        class Repo:
            @tiered(cache)
            def count(self, x: int) -> str:
                return f"{table}:{x}"

        return Repo

    users = make_repo("users")
    with pytest.raises(ConfigError, match="name="):
        make_repo("orders")
    assert users().count(1) == "users:1"


def test_batch_closures_of_one_factory_are_refused(cache: TieredCache) -> None:
    def make(tag: str) -> Any:
        @tiered_batch(cache)
        def load(items: list[int]) -> list[str]:
            return [f"{tag}{i}" for i in items]

        return load

    keep = make("a")
    with pytest.raises(ConfigError, match="name="):
        make("b")
    assert keep([1]) == ["a1"]


def test_what_keeps_working_without_name(cache: TieredCache) -> None:
    def plain(x: int) -> int:
        return x + 1

    # The same function decorated again, on the same cache or another.
    a, b = tiered(cache)(plain), tiered(cache)(plain)
    other = TieredCache(namespace="adv")
    c = tiered(other)(plain)
    assert (a(1), b(1), c(1)) == (2, 2, 2)
    # Closures of one factory on different caches (each cache its own process, in tests).
    usd = [make_converter(TieredCache(namespace="adv"), "usd") for _ in range(2)]
    assert [f(1) for f in usd] == ["1 usd", "1 usd"]
    # A local function made again after the old one is gone (a test helper, a request).
    # (It shares its predecessor's entries: name= it if its results depend on what it captures.)
    for _ in range(3):
        f = make_converter(cache, "usd")
        assert f(1) == "1 usd"
        del f
    # A module-level function defined again (a reloaded module, a re-run notebook cell).
    module: dict[str, Any] = {"__name__": "notebook_cell"}
    first = tiered(cache)(_define("def price(x):\n    return x", module))
    second = tiered(cache)(_define("def price(x):\n    return 2 * x", module))
    assert (first(1), second(3)) == (1, 6)


def _define(source: str, module: dict[str, Any]) -> Any:
    exec(source, module)
    return module["price"]


# -- item 10: the key memos do not keep big arguments alive -----------------------------------


def test_memos_do_not_keep_big_arguments_alive(cache: TieredCache) -> None:
    @tiered(cache)
    def size(text: str, n: int = 0) -> int:
        return len(text)

    for i in range(3):
        big = "x" * 1_000_000 + str(i)
        blob = big.encode()
        before = sys.getrefcount(big), sys.getrefcount(blob)
        assert size(big) == size(big, 1) == size(big, n=2) == 1_000_001
        assert size(blob) == 1_000_001  # type: ignore[arg-type]
        assert (sys.getrefcount(big), sys.getrefcount(blob)) == before, "a memo holds the argument"
    huge = 10**100_000
    before_int = sys.getrefcount(huge)
    size.key(huge)  # type: ignore[arg-type]
    assert sys.getrefcount(huge) == before_int
    small = "user:" + "1" * 20
    before_small = sys.getrefcount(small)
    size(small)
    assert sys.getrefcount(small) > before_small, "small arguments are still memoised (the fast hit path)"


def test_scope_memo_does_not_keep_big_tenants_alive() -> None:
    tenant = "t" * 1_000_000
    before = sys.getrefcount(tenant)
    key = scoped_key("tc:adv:v1:f:x:{d}", tenant, [1, 2])
    assert sys.getrefcount(tenant) == before
    assert key == scoped_key("tc:adv:v1:f:x:{d}", "t" * 1_000_000, [1, 2])


# -- item 12: text Redis cannot hold is the caller's error ------------------------------------


def test_lone_surrogates_are_key_encoding_errors_before_redis(strict_cache: TieredCache) -> None:
    cache = strict_cache
    for call in (
        lambda: cache.get(SURROGATE),
        lambda: cache.set(SURROGATE, 1),
        lambda: cache.delete(SURROGATE),
        lambda: cache.key(SURROGATE),
        lambda: cache.invalidate_tags(SURROGATE),
        lambda: cache.invalidate_tenant(SURROGATE),
    ):
        with pytest.raises(KeyEncodingError, match="surrogate"):
            call()
    with pytest.raises(KeyEncodingError, match="surrogate"), cache.tenant(SURROGATE):
        pass
    with pytest.raises(KeyEncodingError, match="surrogate"):
        tiered(cache, name="tagged", tags=[SURROGATE])(lambda x: x)
    tagged = tiered(cache, name="tagged", tags=lambda x: [x])(lambda x: x)
    by_tenant = tiered(cache, name="by_tenant", tenant=lambda x: x)(lambda x: x)
    for f in (tagged, by_tenant):
        with pytest.raises(KeyEncodingError, match="surrogate"):
            f(SURROGATE)
    with pytest.raises(ConfigError, match="surrogate"):
        tiered(cache, name=SURROGATE)(lambda x: x)
    # Redis was never asked, so it is healthy: a plain set and get work (strict mode raises otherwise).
    assert cache.set("plain", 1).seq is not None
    assert cache.get("plain") == 1
    assert cache.stats().backend_errors == 0


def test_surrogates_inside_arguments_are_fine(cache: TieredCache) -> None:
    # Arguments are digested, never sent as text: any str is a valid argument.
    @tiered(cache, name="echo")
    def echo(path: str) -> str:
        return path

    assert echo(SURROGATE) == SURROGATE
    assert key_of(SURROGATE) != key_of("report-\udcfe.csv")


# -- item 13: deep, self-referencing and repr-breaking arguments ------------------------------


def nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_deep_and_self_referencing_arguments_are_key_encoding_errors(cache: TieredCache) -> None:
    @tiered(cache, name="deep")
    def f(x: Any) -> int:
        return 1

    loop: list[Any] = [1]
    loop.append(loop)
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for bad in (nested(1_000), nested(100_000), loop, cyclic, Password("x") and [nested(2_000)]):
        with pytest.raises(KeyEncodingError, match="nested") as info:
            f(bad)
        assert "'x'" in str(info.value)
        with pytest.raises(KeyEncodingError, match="nested"):
            canonical_bytes(bad)
        with pytest.raises(KeyEncodingError, match="nested"):
            json_key(bad)
    assert f(nested(MAX_DEPTH - 5)) == 1, "reasonable nesting still works"


def test_deep_arguments_fail_cleanly_on_an_almost_full_stack(cache: TieredCache) -> None:
    @tiered(cache, name="deep2")
    def f(x: Any) -> int:
        return 1

    def recurse(n: int) -> Any:
        return recurse(n - 1) if n else f(nested(MAX_DEPTH - 1))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200 + MAX_DEPTH)
    try:
        with pytest.raises(KeyEncodingError, match="nested"):
            recurse(150)
    finally:
        sys.setrecursionlimit(limit)


class BadRepr:
    repr_calls = 0

    def __tiercache_key__(self) -> str:
        return "bad"

    def __repr__(self) -> str:
        BadRepr.repr_calls += 1
        raise RuntimeError("no repr")


def test_error_paths_are_built_only_on_error(cache: TieredCache) -> None:
    @tiered(cache, name="reprs")
    def f(x: Any) -> int:
        return 1

    BadRepr.repr_calls = 0
    assert f({BadRepr(): [1, {"a": (2, 3)}]}) == 1
    assert f.key([{BadRepr(): 1}]) == f.key([{BadRepr(): 1}])
    assert json_key({"a": [1, 2, {"b": 3}]})
    assert BadRepr.repr_calls == 0, "repr() of a dict key is called only to report an error"
    with pytest.raises(KeyEncodingError) as info:
        f({BadRepr(): [1, object()]})
    assert "[<BadRepr object>][1]" in str(info.value)
    with pytest.raises(KeyEncodingError) as info:
        f({"user": {"tags": ["a", object()]}})
    assert "argument 'x'['user']['tags'][1]" in str(info.value)


def test_unencodable_values_of_every_container_name_their_path() -> None:
    @dataclasses.dataclass
    class Row:
        cells: list[Any]

    cases = [
        ((1, [2, object()]), "value[1][1]"),
        ({frozenset({object()})}, "value{…}{…}"),
        (Row([1, object()]), "value.cells[1]"),
        (FirstOnly((1, object())), "value[1]"),
        (Query.model_construct(text=object(), user_id=1), "value['text']"),
    ]
    for value, where in cases:
        with pytest.raises(KeyEncodingError) as info:
            canonical_bytes(value)
        assert where in str(info.value), str(info.value)
    with pytest.raises(KeyEncodingError, match=r"request\[0\]\['a'\]"):
        json_key([{"a": object()}])


def test_dataclass_fields_are_keyed_by_their_stored_values_not_a_masking_getattribute() -> None:
    @dataclasses.dataclass
    class Login:
        user: str
        password: str

        def __getattribute__(self, name: str) -> Any:
            if name == "password":
                return "***"  # masked for logs
            return object.__getattribute__(self, name)

    assert canonical_bytes(Login("alice", "hunter2")) != canonical_bytes(Login("alice", "letmein"))


def test_ordered_dicts_in_different_orders_key_apart() -> None:
    # OrderedDict equality depends on order, so its key must too.
    a, b = collections.OrderedDict(a=1, b=2), collections.OrderedDict(b=2, a=1)
    assert a != b
    assert canonical_bytes(a) != canonical_bytes(b)
    assert canonical_bytes(a) == canonical_bytes(collections.OrderedDict(a=1, b=2))
