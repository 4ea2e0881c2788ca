"""Values through Redis, tried as a hostile user would (issue 9, items 4, 11 and 15).

An L2 hit must return what an L1 hit returns (the same value, of the same type), or the value
must be refused when it is stored, with a CodecError that says what to do. Every test reads the
value back from Redis for real: a second cache on the same fakeredis server (another process),
whose function must not run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import math
import typing
import warnings
import zoneinfo
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import FakeRedisCaches, Mode
from tiercache import CodecError, ConfigError, MsgpackSerializer, tiered, tiered_batch
from tiercache._codec import Codec

# -- classes a hostile user returns -------------------------------------------------------------


class Point(typing.NamedTuple):
    x: int
    y: float = 0.0


Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Tally:
    name: str
    count: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass
class Derived:
    a: int
    b: dataclasses.InitVar[int]
    total: int = dataclasses.field(init=False)

    def __post_init__(self, b: int) -> None:
        self.total = self.a + b


class Aliased(pydantic.BaseModel):
    user_id: int = pydantic.Field(alias="userId")


class Forbidding(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    x: int

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def double(self) -> int:
        return self.x * 2


class Excluding(pydantic.BaseModel):
    name: str
    token: str = pydantic.Field(exclude=True)
    _seen: int = pydantic.PrivateAttr(default=0)


class Shade(enum.IntEnum):
    DARK = 1


class Password(str):
    def __str__(self) -> str:
        return "***"


class Row(tuple):  # type: ignore[type-arg]
    pass


class Tags(set):  # type: ignore[type-arg]
    pass


class Meters(float):
    pass


class Plain(dict):  # type: ignore[type-arg]
    pass


class Named(dt.tzinfo):
    """A tzinfo of a class the serializer does not know (as pytz or dateutil zones are)."""

    def utcoffset(self, when: Any) -> dt.timedelta:
        return dt.timedelta(hours=2)

    def dst(self, when: Any) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, when: Any) -> str:
        return "X"


CLASSES = (Point, Pair, Tally, Derived, Aliased, Forbidding, Excluding, Shade)


def register(serializer: MsgpackSerializer) -> None:
    """Register CLASSES (one by one: a version that refuses one class still gets the others;
    test_register_accepts_namedtuples checks that none is refused)."""
    for cls in CLASSES:
        with contextlib.suppress(ConfigError):
            serializer.register(cls)


def same(a: Any, b: Any) -> bool:
    """Deep equality that also checks exact types (at every level), NaN, float signs, tzinfo,
    fold, numpy dtypes, shapes and writeability, and pydantic/dataclass state."""
    t = type(a)
    if t is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.flags.writeable == b.flags.writeable
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and (a.tobytes() == b.tobytes() if a.dtype.kind not in "SU" else a == b)
    if t is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            len(a) == len(b)
            and getattr(a, "default_factory", None) is getattr(b, "default_factory", None)
            and all(same(k1, k2) and same(v1, v2) for (k1, v1), (k2, v2) in zip(a.items(), b.items(), strict=True))
        )
    if t in (set, frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if t is decimal.Decimal:
        return str(a) == str(b)
    if t in (dt.datetime, dt.time):
        return (
            a.isoformat() == b.isoformat()
            and a.fold == b.fold
            and type(a.tzinfo) is type(b.tzinfo)
            and a.tzname() == b.tzname()
            and a.utcoffset() == b.utcoffset()
        )
    if dataclasses.is_dataclass(a):
        return same(vars(a), vars(b))
    if isinstance(a, pydantic.BaseModel):
        return (
            same(a.__dict__, b.__dict__)
            and a.model_fields_set == b.model_fields_set
            and a.__pydantic_private__ == b.__pydantic_private__
            and a.__pydantic_extra__ == b.__pydantic_extra__
        )
    if isinstance(a, enum.Enum):
        return a is b
    return bool(a == b)


# -- two processes on one Redis -----------------------------------------------------------------


class Pair2:
    """A writer cache and a reader cache on one fakeredis server, and a decorated function on
    each with the same name: the reader's copy must come from Redis, never from its function."""

    def __init__(self, **kwargs: Any) -> None:
        self.fake = FakeRedisCaches(Mode("sync"), "adv", **kwargs)
        self.writer = self.fake.cache()
        self.reader = self.fake.cache()
        register(self.reader.serializer)
        self.value: Any = None
        self.reader_calls = 0

        @tiered(self.writer, name="adv.produce")
        def produce(n: int) -> Any:
            return self.value

        @tiered(self.reader, name="adv.produce")
        def read(n: int) -> Any:
            self.reader_calls += 1
            return None

        self.produce, self.read = produce, read

    def round_trip(self, value: Any, n: int = 0) -> tuple[Any, Any]:
        """(what the writer returned and keeps in L1, what the reader got from Redis)."""
        self.value = value
        first = self.produce(n)
        assert first is value  # the writer's caller gets the function's own object ...
        assert self.produce(n) is value  # ... and so does its next caller (an L1 hit)
        return first, self.read(n)


@pytest.fixture
def pair() -> Iterator[Pair2]:
    p = Pair2()
    yield p
    p.fake.close()


def _masked() -> Any:
    return np.ma.masked_array([1, 2, 1000], mask=[False, False, True])


def _matrix() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix([[1, 2]])


def _read_only() -> Any:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    a.flags.writeable = False
    return a


def _tally() -> Tally:
    t = Tally("x")
    t.count = 41
    return t


# Item 4 (and the namedtuple half of 15): values that used to change on the way through Redis.
ROUND_TRIPS: dict[str, Callable[[], Any]] = {
    "numpy float64 scalar": lambda: np.float64(1.5),
    "numpy int8 scalar": lambda: np.int8(-3),
    "numpy bool scalar": lambda: np.bool_(True),
    "numpy str scalar with a trailing NUL": lambda: np.str_("a\x00"),
    "numpy datetime64 scalar": lambda: np.datetime64("2024-02-29T12:00", "m"),
    "numpy datetime64 array": lambda: np.array(["2024-01-01", "NaT"], dtype="datetime64[D]"),
    "numpy fixed-width str array": lambda: np.array(["ab", "c"]),
    "writable numpy array": lambda: np.arange(6, dtype=np.float32).reshape(3, 2),
    "read-only numpy array": _read_only,
    "big-endian numpy array": lambda: np.arange(3, dtype=">i4"),
    "0-d numpy array": lambda: np.array(7.0),
    "bytearray": lambda: bytearray(b"\x00\xc4ab"),
    "bytearray nested in lists and dicts": lambda: [{"k": bytearray(b"x")}, (bytearray(b"y"),), {bytearray(b"z")[0]}],
    "dataclass with an init=False field": _tally,
    "dataclass with an InitVar": lambda: Derived(1, 2),
    "typing.NamedTuple": lambda: Point(1, 2.5),
    "collections.namedtuple": lambda: Pair("l", [Point(0)]),
    "OrderedDict": lambda: collections.OrderedDict([("b", 1), ("a", 2)]),
    "Counter": lambda: collections.Counter("hello"),
    "defaultdict(list)": lambda: collections.defaultdict(list, {"a": [1]}),
    "IntEnum": lambda: Shade.DARK,
    "datetime in a ZoneInfo": lambda: dt.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    "datetime with fold=1": lambda: dt.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("US/Eastern")),
    "naive datetime with fold=1": lambda: dt.datetime(2024, 1, 1, fold=1),
    "datetime in a named fixed offset": lambda: dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1), "X")),
    "time in a ZoneInfo": lambda: dt.time(9, 30, tzinfo=zoneinfo.ZoneInfo("UTC")),
    "str with a lone surrogate": lambda: "caf\udce9",
    "Decimal signed zero": lambda: decimal.Decimal("-0.000"),
    "tuple vs list": lambda: ([1, (2, [3])], (4,)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_l2_hit_returns_what_l1_returns(pair: Pair2, case: str) -> None:
    value = ROUND_TRIPS[case]()
    first, second = pair.round_trip(value)
    assert pair.reader_calls == 0, "the reader's value did not come from Redis"
    stats = pair.reader.stats()
    assert (stats.l2_hits, stats.codec_errors) == (1, 0)
    assert same(first, second), (first, second)
    assert pair.read(0) is second  # and the reader keeps it in L1


def test_masked_array_is_refused_not_unmasked(pair: Pair2) -> None:
    """The issue's case: the masked sum is 3; from L2 it used to be 1003 (the mask lost)."""
    value = pair.value = _masked()
    assert pair.produce(0) is value and value.sum() == 3
    assert pair.writer.stats().not_cached == 1
    assert pair.fake.raw.get(pair.produce.key(0)) is None  # nothing stored (and the lease freed)
    assert pair.read(0) is None and pair.reader_calls == 1
    with pytest.raises(CodecError, match=r"MaskedArray is a subclass of numpy.ndarray.*mask"):
        pair.writer.set("m", value)


REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    "numpy masked array": (_masked, "MaskedArray"),
    "numpy matrix": (_matrix, "matrix"),
    "numpy object array": (lambda: np.array([1, "a"], dtype=object), "dtype object"),
    "numpy structured array": (lambda: np.zeros(2, dtype=[("a", "i4")]), "structured"),
    "numpy void scalar": (lambda: np.zeros(1, dtype=[("a", "i4")])[0], "structured"),
    "memoryview": (lambda: memoryview(b"abc"), "memoryview"),
    "memoryview in a list": (lambda: [memoryview(b"abc")], "memoryview"),
    "str subclass": (lambda: Password("hunter2"), "subclass of str"),
    "tuple subclass": (lambda: Row((1, 2)), "subclass of tuple"),
    "set subclass": (lambda: Tags({1}), "subclass of set"),
    "float subclass": (lambda: Meters(1.0), "subclass of float"),
    "dict subclass": (lambda: Plain(a=1), "subclass of dict"),
    "defaultdict of a lambda": (lambda: collections.defaultdict(lambda: 0), "default_factory"),
    "datetime with an unknown tzinfo class": (lambda: dt.datetime(2024, 1, 1, tzinfo=Named()), "tzinfo of type"),
    "tuple subclass nested in a list": (lambda: [1, Row(())], "subclass of tuple"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_value_that_would_change_is_refused_at_store_time(pair: Pair2, case: str) -> None:
    make, message = REFUSED[case]
    value = pair.value = make()
    assert pair.produce(0) is value  # returned, uncached, counted
    assert pair.writer.stats().not_cached == 1
    assert pair.fake.raw.get(pair.produce.key(0)) is None
    with pytest.raises(CodecError, match=message):
        pair.writer.set("v", value)


# -- item 15: pydantic models that were written but unreadable everywhere else --------------


def _excluding() -> Excluding:
    m = Excluding(name="alice", token="secret-token")
    m._seen = 3
    return m


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Aliased(userId=7), id="alias"),
        pytest.param(lambda: Forbidding(x=2), id="computed_field-extra-forbid"),
        pytest.param(_excluding, id="excluded-field-and-private-attr"),
    ],
)
def test_pydantic_model_read_back_from_redis_elsewhere(pair: Pair2, make: Callable[[], Any]) -> None:
    value = make()
    first, second = pair.round_trip(value)
    assert pair.reader_calls == 0 and pair.reader.stats().codec_errors == 0
    assert same(first, second) and first == second


def test_namedtuple_registered_by_return_annotation() -> None:
    """A reader that registers nothing explicitly: the annotation registers the namedtuple."""
    fake = FakeRedisCaches(Mode("sync"), "adv-nt")
    try:
        writer, reader = fake.cache(), fake.cache()

        @tiered(writer, name="nt")
        def write() -> list[Point]:
            return [Point(1, 2.0)]

        @tiered(reader, name="nt")
        def read() -> list[Point]:
            raise AssertionError("must come from Redis")

        written = write()
        got = read()
        assert got == written and type(got[0]) is Point and reader.stats().codec_errors == 0
    finally:
        fake.close()


def test_register_accepts_namedtuples() -> None:
    s = MsgpackSerializer()
    s.register(Point, Pair)
    codec = Codec(s)
    assert codec.decode("k", Codec(MsgpackSerializer()).encode("k", Pair(1, 2))) == Pair(1, 2)


# -- item 11: l1_maxbytes counts what the process holds --------------------------------------


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_l1_maxbytes_counts_the_uncompressed_size(compression: str) -> None:
    """With a 1 MB bound, compressible 2 MB strings are 2 MB each (not the ~10 KB they take
    compressed): none is held, whichever path fills L1."""
    fake = FakeRedisCaches(Mode("sync"), "adv-bytes", l1_maxbytes=1_000_000, compression=compression)
    try:
        writer, reader = fake.cache(), fake.cache()
        big = [chr(ord("a") + i) * 2_000_000 for i in range(5)]

        @tiered(writer, name="big")
        def load(i: int) -> str:
            return big[i]

        @tiered(reader, name="big")
        def read(i: int) -> str:
            raise AssertionError("must come from Redis")

        @tiered_batch(writer, name="bigs")
        def load_many(items: list[int]) -> list[str]:
            return [big[i] for i in items]

        for i in range(5):
            assert load(i) is big[i]  # a load
            assert read(i) == big[i]  # an L2 hit
            writer.set(f"s{i}", big[i])  # a write
        assert load_many([0, 1]) == big[:2]  # a batch load
        for cache in (writer, reader):
            assert len(cache._core.local) == 0 and cache._core.local.bytes == 0
        assert len(fake.raw.get(load.key(0)) or b"") < 100_000  # Redis holds it compressed

        # Below the bound: held, and counted at its serialized size (2 MB / 5 + a 5-byte header).
        small = "z" * 200_000
        writer.set("small", small, wait=True, timeout=5)  # the reader has seen every message before it reads
        assert reader.get("small") == small
        for cache in (writer, reader):
            assert cache._core.local.bytes == 200_005
    finally:
        fake.close()


def test_held_size_without_a_memo_measures_the_envelope() -> None:
    for compression in ("zlib", "zstd", None):
        codec = Codec(MsgpackSerializer(), compression=compression, signing_key=b"k" * 16)
        data = codec.encode("k", "q" * 50_000)
        plain = bytes(data)  # as read from Redis, not decoded on this thread
        assert codec.held_size(data) == codec.held_size(plain) == 50_003


# -- the whole class: a property -------------------------------------------------------------

codec = Codec(MsgpackSerializer(), compress_threshold=64)
register(codec.serializer)

hostile_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.binary(max_size=8).map(bytearray)
    | st.binary(max_size=4).map(memoryview)
    | st.decimals()
    | st.uuids()
    | st.dates()
    | st.timedeltas()
    | st.datetimes(timezones=st.none() | st.timezones() | st.just(dt.timezone(dt.timedelta(hours=3), "EAT")))
    | st.times(timezones=st.none() | st.just(dt.timezone.utc) | st.just(Named()))
    | st.sampled_from([np.float64(-0.0), np.float32("nan"), np.int64(2**40), np.uint8(7), np.complex64(1j)])
    | st.sampled_from([np.str_("x\x00"), np.bytes_(b"y"), np.datetime64("NaT"), np.timedelta64(3, "s")])
    | st.lists(st.integers(-100, 100), max_size=4).map(np.array)
    | st.builds(_read_only)
    | st.builds(_masked)
    | st.builds(Point, st.integers(), st.floats(allow_nan=False))
    | st.builds(Pair, st.integers(), st.text(max_size=3))
    | st.builds(_tally)
    | st.builds(Derived, st.integers(), st.integers())
    | st.builds(Aliased, userId=st.integers())
    | st.builds(Forbidding, x=st.integers())
    | st.builds(_excluding)
    | st.sampled_from(Shade)
    | st.text(max_size=4).map(Password)
    | st.floats(allow_nan=False).map(Meters)
    | st.lists(st.integers(), max_size=2).map(Row)
)
hashable = st.none() | st.integers() | st.text(max_size=4) | st.tuples(st.integers(), st.text(max_size=2))
hostile = st.recursive(
    hostile_leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(hashable, inner, max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(collections.OrderedDict)
        | st.dictionaries(st.text(max_size=3), st.integers(), max_size=3).map(collections.Counter)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(lambda d: collections.defaultdict(list, d))
        | st.sets(hashable, max_size=3)
        | st.frozensets(hashable, max_size=3)
        | st.sets(hashable, max_size=3).map(Tags)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=hostile)
def test_every_value_round_trips_exactly_or_is_refused(value: Any) -> None:
    """value -> encode -> decode is the same value of the same type as what L1 holds, or the
    encode raises CodecError: never a value that silently comes back different."""
    try:
        data = codec.encode("k", value)
    except CodecError:
        return
    back = codec.decode("k", bytes(data))
    assert same(value, back), (value, back)
