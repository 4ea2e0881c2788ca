"""Properties of value envelopes: every supported value round-trips, and no bytes make decode
raise anything but CodecError."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
from typing import Any

import msgpack
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache import CodecError, MsgpackSerializer, TieredCache, tiered
from tiercache._codec import Codec

KEY = "tc:prop:v1:k:{v}"
SECRET = b"k" * 32


class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    PAIR = (1, 2)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass
class Box:
    label: str
    items: list[Any]
    when: dt.datetime | None = None


class User(pydantic.BaseModel):
    id: int
    name: str
    tags: list[str]
    joined: dt.date
    level: Level = Level.LOW


# -- strategies -------------------------------------------------------------------------------

# Whole seconds: sub-second UTC offsets have their own unit test (test_codec.py).
offsets = st.integers(-86399, 86399).map(lambda s: dt.timedelta(seconds=s))
timezones = offsets.map(dt.timezone)
points = st.builds(Point, st.integers(), st.floats(allow_nan=False))
users = st.builds(
    User,
    id=st.integers(-(2**63), 2**63 - 1),
    name=st.text(max_size=10),
    tags=st.lists(st.text(max_size=5), max_size=3),
    joined=st.dates(),
    level=st.sampled_from(Level),
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**64, max_value=2**300)
    | st.integers(min_value=-(2**300), max_value=-(2**63) - 1)
    | st.sampled_from([2**64 - 1, -(2**63), 2**63, -(2**63) - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.datetimes()
    | st.datetimes(timezones=timezones)
    | st.dates()
    | st.times()
    | st.times(timezones=timezones)
    | st.timedeltas()
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.uuids()
    | st.sampled_from(Color)
    | st.sampled_from(Level)
    | points
    | users
)
hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.dates()
    | st.uuids()
    | st.sampled_from(Color)
    | points,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=5,
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Box, st.text(max_size=5), st.lists(inner, max_size=3), st.none() | st.datetimes())
    ),
    max_leaves=15,
)


def same(a: Any, b: Any) -> bool:
    """Deep equality that also checks exact types, float signs, NaN and Decimal spelling."""
    t = type(a)
    if t is not type(b):
        return False
    if t is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if t in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if t is dict:
        return len(a) == len(b) and all(
            same(k1, k2) and same(v1, v2) for (k1, v1), (k2, v2) in zip(a.items(), b.items(), strict=True)
        )
    if t in (set, frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if t is decimal.Decimal:
        return str(a) == str(b)
    if t in (dt.datetime, dt.time):
        return a.isoformat() == b.isoformat() and a.utcoffset() == b.utcoffset()
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, pydantic.BaseModel):
        return same(a.model_dump(), b.model_dump())
    if isinstance(a, enum.Enum):
        return a is b
    return bool(a == b)


# -- codecs -----------------------------------------------------------------------------------

WRITER = MsgpackSerializer()
WRITER.register(Point, Box, User, Color, Level)
CODECS = {
    "plain": Codec(WRITER, compression=None),
    "zlib": Codec(WRITER, compression="zlib", compress_threshold=0),
    "zstd": Codec(WRITER, compression="zstd", compress_threshold=0),
    "signed": Codec(WRITER, signing_key=SECRET, compress_threshold=64),
}

READER_CACHE = TieredCache(namespace="prop")


@tiered(READER_CACHE)
def produce() -> tuple[Box, User, list[Point], dict[Color, Level]]:
    raise AssertionError("never called")


READER = READER_CACHE._core.codec  # its serializer learnt the classes from produce's annotation only


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_round_trip(name: str, value: Any) -> None:
    codec = CODECS[name]
    data = codec.encode(KEY, value)
    back = codec.decode(KEY, data)
    assert same(value, back), (value, back)
    assert same(codec.decode(KEY, codec.encode(KEY, back)), value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_classes_registered_by_return_annotation_decode(value: Any) -> None:
    data = CODECS["zstd"].encode(KEY, value)
    back = READER.decode(KEY, data)
    assert same(value, back), (value, back)


@settings(max_examples=100, deadline=None)
@given(value=values, threshold=st.integers(0, 300), compression=st.sampled_from(["zlib", "zstd"]))
def test_compressed_iff_at_threshold_and_smaller(value: Any, threshold: int, compression: str) -> None:
    codec = Codec(WRITER, compression=compression, compress_threshold=threshold)
    body = WRITER.dumps(value)
    data = codec.encode(KEY, value)
    if len(body) < threshold:
        assert data[3] == 0
        assert data[4:] == body
    elif data[3]:
        assert data[3] == (1 if compression == "zlib" else 2)
        assert len(data) - 4 < len(body)
    else:
        assert data[4:] == body
    assert same(codec.decode(KEY, data), value)


# -- hostile bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=100, deadline=None)
@given(
    header=st.tuples(
        st.sampled_from([0xC7, 0, 0xFF]),
        st.sampled_from([1, 0, 2]),
        st.sampled_from([1, 2, 3, 16]),
        st.integers(0, 255),
    ),
    body=st.binary(max_size=200),
)
def test_any_bytes_decode_or_raise_codec_error(name: str, header: tuple[int, int, int, int], body: bytes) -> None:
    try:
        CODECS[name].decode(KEY, bytes(header) + body)
    except CodecError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    ext=st.integers(0, 127),
    payload=st.binary(max_size=60) | values.map(WRITER.dumps) | st.lists(values, max_size=3).map(WRITER.dumps),
)
def test_any_extension_payload_raises_only_codec_error(ext: int, payload: bytes) -> None:
    body = msgpack.packb([1, msgpack.ExtType(ext, payload)])
    try:
        CODECS["plain"].decode(KEY, bytes((0xC7, 1, 1, 0)) + body)
    except CodecError:
        pass


@settings(max_examples=100, deadline=None)
@given(value=values, data=st.data())
def test_mutated_envelope_raises_only_codec_error(value: Any, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(CODECS)))
    codec = CODECS[name]
    envelope = bytearray(codec.encode(KEY, value))
    index = data.draw(st.integers(0, len(envelope) - 1))
    envelope[index] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(envelope)))
    mutated = bytes(envelope[:cut]) if data.draw(st.booleans()) else bytes(envelope)
    try:
        codec.decode(KEY, mutated)
    except CodecError:
        return
    if name == "signed":
        raise AssertionError("a signed envelope changed in any byte must not decode")


@settings(max_examples=100, deadline=None)
@given(value=values, other=st.text(min_size=1, max_size=10))
def test_signed_value_is_bound_to_its_key(value: Any, other: str) -> None:
    codec = CODECS["signed"]
    data = codec.encode(KEY, value)
    other_key = f"tc:prop:v1:k:{{{other}}}"
    if other_key == KEY:
        return
    with pytest.raises(CodecError):
        codec.decode(other_key, data)
