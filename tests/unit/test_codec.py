"""Value envelopes: compression, corrupt bytes, signatures, pickle safety, size limits."""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import msgpack
import pytest

from tiercache import (
    CodecError,
    ConfigError,
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    TieredCache,
    ValueTooLargeError,
    tiered,
)
from tiercache._codec import Codec

SECRET = b"s" * 32
KEY = "tc:codec:v1:k:{a}"
MAGIC = 0xC7

# -- payloads that would have side effects if they were ever unpickled -----------------------

TRIPPED: list[str] = []


def trip(tag: str) -> None:
    TRIPPED.append(tag)


class Evil:
    """Unpickling this calls ``trip`` (sets a flag) and ``os.mkdir`` (makes a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_evil_effects, (str(self.path),))


def _evil_effects(path: str) -> str:
    trip(path)
    os.mkdir(path)
    return "pwned"


@pytest.fixture(autouse=True)
def _reset_tripped() -> None:
    TRIPPED.clear()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def make_cache(server: fakeredis.FakeServer) -> Iterator[Callable[..., TieredCache]]:
    caches: list[TieredCache] = []

    def make(**kwargs: Any) -> TieredCache:
        cache = TieredCache(client=fakeredis.FakeRedis(server=server), namespace="codec", **kwargs)
        caches.append(cache)
        assert cache.ready()
        return cache

    yield make
    for cache in caches:
        cache.close()


def evil_pickle(path: Path) -> bytes:
    return pickle.dumps(Evil(path), protocol=pickle.HIGHEST_PROTOCOL)


def test_evil_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload really does run code when unpickled, so the tests below mean something."""
    target = tmp_path / "control"
    assert pickle.loads(evil_pickle(target)) == "pwned"
    assert target.is_dir()
    assert [str(target)] == TRIPPED


# -- compression ---------------------------------------------------------------------------


@pytest.mark.parametrize(("compression", "flag"), [("zlib", 1), ("zstd", 2)])
def test_compression_above_threshold_only(compression: str, flag: int) -> None:
    codec = Codec(MsgpackSerializer(), compression=compression, compress_threshold=100)
    big = "x" * 5000
    data = codec.encode(KEY, big)
    assert data[3] & 0b11 == flag
    assert len(data) < 1000
    assert codec.decode(KEY, data) == big

    small = "x" * 50
    data = codec.encode(KEY, small)
    assert data[3] == 0
    assert data[4:] == msgpack.packb(small)
    assert codec.decode(KEY, data) == small


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compression_threshold_boundary(compression: str) -> None:
    ser = MsgpackSerializer()
    value = "y" * 300
    body_len = len(ser.dumps(value))
    at = Codec(ser, compression=compression, compress_threshold=body_len)
    above = Codec(ser, compression=compression, compress_threshold=body_len + 1)
    assert at.encode(KEY, value)[3] & 0b11 != 0
    assert above.encode(KEY, value)[3] & 0b11 == 0


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_incompressible_value_is_stored_plain(compression: str) -> None:
    codec = Codec(MsgpackSerializer(), compression=compression, compress_threshold=10)
    noise = os.urandom(4000)
    data = codec.encode(KEY, noise)
    assert data[3] == 0
    assert codec.decode(KEY, data) == noise


def test_compression_none_never_compresses() -> None:
    codec = Codec(MsgpackSerializer(), compression=None, compress_threshold=0)
    data = codec.encode(KEY, "z" * 10000)
    assert data[3] == 0


def test_auto_compression_uses_zstd_when_installed() -> None:
    codec = Codec(MsgpackSerializer(), compression="auto", compress_threshold=10)
    assert codec.encode(KEY, "z" * 10000)[3] & 0b11 == 2


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_decompression_bomb_is_refused(compression: str) -> None:
    codec = Codec(MsgpackSerializer(), compression=compression, compress_threshold=10, max_decoded_bytes=1 << 20)
    data = codec.encode(KEY, bytes(8 << 20))
    assert len(data) < 100_000
    with pytest.raises(CodecError):
        codec.decode(KEY, data)


# -- bytes that are not ours ------------------------------------------------------------------


@pytest.fixture(params=["plain", "zlib", "zstd", "signed"])
def codec(request: pytest.FixtureRequest) -> Codec:
    kind = request.param
    if kind == "plain":
        return Codec(MsgpackSerializer(), compression=None)
    if kind == "signed":
        return Codec(MsgpackSerializer(), signing_key=SECRET, compress_threshold=10)
    return Codec(MsgpackSerializer(), compression=kind, compress_threshold=10)


VALUE = {"name": "a" * 200, "n": list(range(50)), "t": (1, 2)}


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xc7", b"\xc7\x01", b"\xc7\x01\x01", b"hello world", b"\x00" * 64, b"\xc7\x01\x01\x00\xc1"],
)
def test_garbage_is_codec_error(codec: Codec, garbage: bytes) -> None:
    with pytest.raises(CodecError):
        codec.decode(KEY, garbage)


def test_every_truncation_is_codec_error(codec: Codec) -> None:
    data = codec.encode(KEY, VALUE)
    decoded_prefixes = []
    for n in range(len(data)):
        try:
            codec.decode(KEY, data[:n])
        except CodecError:
            continue
        decoded_prefixes.append(n)
    assert decoded_prefixes == [], f"{len(data)}-byte envelope decoded when cut to {decoded_prefixes}"


def test_trailing_bytes_are_codec_error(codec: Codec) -> None:
    data = codec.encode(KEY, VALUE)
    with pytest.raises(CodecError):
        codec.decode(KEY, data + b"\x00junk")


def test_wrong_magic_version_flags_serializer(codec: Codec) -> None:
    data = bytearray(codec.encode(KEY, VALUE))
    assert codec.decode(KEY, bytes(data)) == VALUE
    for index, value in [(0, 0xC6), (0, 0), (1, 0), (1, 2), (1, 255), (2, 2), (2, 3), (2, 200)]:
        bad = bytearray(data)
        bad[index] = value
        with pytest.raises(CodecError):
            codec.decode(KEY, bytes(bad))
    for extra_flag in (0b1000, 0b10000, 0x80):
        bad = bytearray(data)
        bad[3] |= extra_flag
        with pytest.raises(CodecError, match="flags"):
            codec.decode(KEY, bytes(bad))


def test_unknown_compression_bits_are_codec_error() -> None:
    codec = Codec(MsgpackSerializer(), compression=None)
    data = bytearray(codec.encode(KEY, "x"))
    for compression in (1, 2, 3):
        bad = bytearray(data)
        bad[3] = compression
        with pytest.raises(CodecError):
            codec.decode(KEY, bytes(bad))


def test_corrupt_compressed_body_is_codec_error() -> None:
    for compression in ("zlib", "zstd"):
        codec = Codec(MsgpackSerializer(), compression=compression, compress_threshold=10)
        data = bytearray(codec.encode(KEY, "q" * 3000))
        data[8] ^= 0xFF
        data[-2] ^= 0xFF
        with pytest.raises(CodecError):
            codec.decode(KEY, bytes(data))


def test_a_different_serializer_id_is_codec_error() -> None:
    msgpack_codec = Codec(MsgpackSerializer())
    json_codec = Codec(JsonSerializer())
    assert json_codec.decode(KEY, json_codec.encode(KEY, [1, "a"])) == [1, "a"]
    with pytest.raises(CodecError, match="serializer"):
        json_codec.decode(KEY, msgpack_codec.encode(KEY, [1]))
    with pytest.raises(CodecError, match="serializer"):
        msgpack_codec.decode(KEY, json_codec.encode(KEY, [1]))


def test_unknown_msgpack_extension_is_codec_error() -> None:
    codec = Codec(MsgpackSerializer(), compression=None)
    body = msgpack.packb(msgpack.ExtType(99, b"x"))
    with pytest.raises(CodecError):
        codec.decode(KEY, bytes((MAGIC, 1, 1, 0)) + body)
    body = msgpack.packb(msgpack.ExtType(5, msgpack.packb("not a list")))  # timedelta ext, wrong payload
    with pytest.raises(CodecError):
        codec.decode(KEY, bytes((MAGIC, 1, 1, 0)) + body)


def test_decode_error_message_names_key() -> None:
    codec = Codec(MsgpackSerializer())
    with pytest.raises(CodecError, match=r"tc:codec:v1:k:\{a\}"):
        codec.decode(KEY, b"junk")


# -- unregistered classes ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Shade(enum.Enum):
    DARK = "dark"
    LIGHT = "light"


def test_unregistered_dataclass_is_codec_error_and_registered_one_decodes() -> None:
    writer = Codec(MsgpackSerializer())
    data = writer.encode(KEY, [Point(1, 2), Shade.DARK])
    assert writer.decode(KEY, data) == [Point(1, 2), Shade.DARK]  # learnt by encoding

    reader_ser = MsgpackSerializer()
    reader = Codec(reader_ser)
    with pytest.raises(CodecError, match="not registered"):
        reader.decode(KEY, data)
    reader_ser.register(Point)
    with pytest.raises(CodecError, match="not registered"):
        reader.decode(KEY, data)
    reader_ser.register(Shade)
    assert reader.decode(KEY, data) == [Point(1, 2), Shade.DARK]


def test_register_annotation_finds_nested_classes() -> None:
    ser = MsgpackSerializer()
    ser.register_annotation(dict[str, list[tuple[Point, Shade | None]]])
    data = Codec(MsgpackSerializer()).encode(KEY, {"a": [(Point(0, 1), Shade.LIGHT)]})
    assert Codec(ser).decode(KEY, data) == {"a": [(Point(0, 1), Shade.LIGHT)]}


def test_register_rejects_other_classes() -> None:
    with pytest.raises(ConfigError):
        MsgpackSerializer().register(int)
    with pytest.raises(ConfigError):
        MsgpackSerializer().register(Path)


def test_class_name_in_bytes_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"tc_import_canary_{uuid.uuid4().hex}"
    canary = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(canary)!r}).write_text('yes')\n"
        "import dataclasses\n@dataclasses.dataclass\nclass Thing:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    codec = Codec(MsgpackSerializer(), compression=None)
    for code in (10, 11, 14):
        payload = msgpack.packb([f"{module}.Thing", {}] if code != 14 else [f"{module}.Thing", 1])
        body = msgpack.packb(msgpack.ExtType(code, payload))
        with pytest.raises(CodecError):
            codec.decode(KEY, bytes((MAGIC, 1, 1, 0)) + body)
    assert module not in sys.modules
    assert not canary.exists()
    body = msgpack.packb(msgpack.ExtType(10, msgpack.packb(["os.system", {"command": "true"}])))
    with pytest.raises(CodecError):
        codec.decode(KEY, bytes((MAGIC, 1, 1, 0)) + body)


# -- pickle and signatures --------------------------------------------------------------------


def test_pickle_without_signing_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="signing_key"):
        Codec(PickleSerializer())
    with pytest.raises(ConfigError, match="signing_key"):
        TieredCache(namespace="codec", serializer=PickleSerializer())


@pytest.mark.parametrize("key", [b"short", "a string key of 32 characters!!", b""])
def test_bad_signing_key_is_config_error(key: Any) -> None:
    with pytest.raises(ConfigError, match="signing_key"):
        Codec(PickleSerializer(), signing_key=key)


def test_signed_pickle_round_trip() -> None:
    codec = Codec(PickleSerializer(), signing_key=SECRET)
    value = {"path": Path("/x"), "p": Point(1, 2), "big": "z" * 5000}
    data = codec.encode(KEY, value)
    assert data[3] & 0b100
    assert codec.decode(KEY, data) == value


def _signed_evil(tmp_path: Path, name: str) -> tuple[Codec, bytes, Path]:
    """An envelope carrying the evil pickle, correctly signed by the cache's key."""
    codec = Codec(PickleSerializer(), signing_key=SECRET, compression=None)
    target = tmp_path / name
    body = evil_pickle(target)
    header = bytes((MAGIC, 1, 3, 0b100))
    data = header + codec._mac(KEY, header, body) + body
    return codec, data, target


def test_tampered_body_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    codec, data, target = _signed_evil(tmp_path, "body")
    honest = codec.encode(KEY, "honest")
    tampered = honest[:36] + data[36:]  # the honest signature, the evil body
    with pytest.raises(CodecError, match="signature"):
        codec.decode(KEY, tampered)
    flipped = bytearray(honest)
    flipped[-1] ^= 1
    with pytest.raises(CodecError, match="signature"):
        codec.decode(KEY, bytes(flipped))
    assert TRIPPED == []
    assert not target.exists()


def test_tampered_header_is_refused(tmp_path: Path) -> None:
    codec = Codec(PickleSerializer(), signing_key=SECRET, compress_threshold=10)
    data = codec.encode(KEY, "h" * 3000)
    assert data[3] & 0b11  # compressed
    bad = bytearray(data)
    bad[3] &= ~0b11  # claim "not compressed"
    with pytest.raises(CodecError):
        codec.decode(KEY, bytes(bad))
    bad = bytearray(data)
    bad[3] &= ~0b100  # claim "not signed"
    with pytest.raises(CodecError):
        codec.decode(KEY, bytes(bad))


def test_value_moved_to_another_key_is_refused(tmp_path: Path) -> None:
    codec, data, target = _signed_evil(tmp_path, "moved")
    with pytest.raises(CodecError, match="signature"):
        codec.decode("tc:codec:v1:k:{b}", data)
    honest = codec.encode(KEY, "mine")
    with pytest.raises(CodecError, match="signature"):
        codec.decode("tc:codec:v1:k:{b}", honest)
    assert TRIPPED == []
    assert not target.exists()


def test_other_signing_key_is_refused(tmp_path: Path) -> None:
    _, data, target = _signed_evil(tmp_path, "otherkey")
    other = Codec(PickleSerializer(), signing_key=b"o" * 32)
    with pytest.raises(CodecError, match="signature"):
        other.decode(KEY, data)
    assert TRIPPED == []
    assert not target.exists()


def test_unsigned_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    target = tmp_path / "unsigned"
    body = evil_pickle(target)
    pickle_codec = Codec(PickleSerializer(), signing_key=SECRET)
    for flags in (0, 1, 2):
        with pytest.raises(CodecError):
            pickle_codec.decode(KEY, bytes((MAGIC, 1, 3, flags)) + body)
    # with the signed flag but no (or a zero) signature
    with pytest.raises(CodecError):
        pickle_codec.decode(KEY, bytes((MAGIC, 1, 3, 0b100)) + bytes(32) + body)
    with pytest.raises(CodecError):
        pickle_codec.decode(KEY, bytes((MAGIC, 1, 3, 0b100)) + body)
    # a msgpack cache never unpickles either, signed or not
    for msgpack_codec in (Codec(MsgpackSerializer()), Codec(MsgpackSerializer(), signing_key=SECRET)):
        with pytest.raises(CodecError):
            msgpack_codec.decode(KEY, bytes((MAGIC, 1, 3, 0)) + body)
        with pytest.raises(CodecError):
            msgpack_codec.decode(KEY, bytes((MAGIC, 1, 1, 0)) + body)
    assert TRIPPED == []
    assert not target.exists()


def test_signed_cache_refuses_unsigned_msgpack() -> None:
    unsigned = Codec(MsgpackSerializer()).encode(KEY, "x")
    signed = Codec(MsgpackSerializer(), signing_key=SECRET)
    with pytest.raises(CodecError, match="not signed"):
        signed.decode(KEY, unsigned)
    unsigned_reader = Codec(MsgpackSerializer())
    with pytest.raises(CodecError, match="signed"):
        unsigned_reader.decode(KEY, signed.encode(KEY, "x"))


def test_evil_pickle_planted_in_redis_is_a_miss(
    tmp_path: Path, server: fakeredis.FakeServer, make_cache: Callable[..., TieredCache]
) -> None:
    raw = fakeredis.FakeRedis(server=server)
    cache = make_cache(serializer=PickleSerializer(), signing_key=SECRET)
    calls: list[int] = []

    @tiered(cache)
    def f(x: int) -> list[int]:
        calls.append(x)
        return [x]

    target = tmp_path / "planted"
    raw.set(f.key(1), bytes((MAGIC, 1, 3, 0)) + evil_pickle(target))
    raw.set(cache.key("k"), bytes((MAGIC, 1, 3, 0b100)) + bytes(32) + evil_pickle(target))
    assert f(1) == [1]
    assert cache.get("k", "dflt") == "dflt"
    assert calls == [1]
    assert cache.stats().codec_errors == 2
    assert TRIPPED == []
    assert not target.exists()


# -- size limits ------------------------------------------------------------------------------


def test_max_value_bytes() -> None:
    codec = Codec(MsgpackSerializer(), max_value_bytes=1000, compress_threshold=100)
    with pytest.raises(ValueTooLargeError, match="max_value_bytes=1000"):
        codec.encode(KEY, os.urandom(2000))
    assert issubclass(ValueTooLargeError, CodecError)
    codec.encode(KEY, os.urandom(900))
    codec.encode(KEY, b"\x00" * 100_000)  # compresses below the limit


def test_max_value_bytes_through_cache(server: fakeredis.FakeServer, make_cache: Callable[..., TieredCache]) -> None:
    raw = fakeredis.FakeRedis(server=server)
    cache = make_cache(max_value_bytes=1000)
    with pytest.raises(ValueTooLargeError):
        cache.set("big", os.urandom(2000))
    assert raw.get(cache.key("big")) is None
    calls: list[int] = []

    @tiered(cache)
    def big(n: int) -> bytes:
        calls.append(n)
        return os.urandom(n)

    value = big(5000)
    assert len(value) == 5000
    assert raw.get(big.key(5000)) is None
    assert cache._core.local.get(big.key(5000)) is not value
    assert cache.stats().not_cached == 1
    big(5000)
    assert calls == [5000, 5000]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compression": "lz4"}, "compression"),
        ({"compress_threshold": -1}, "compress_threshold"),
        ({"max_value_bytes": 0}, "max_value_bytes"),
        ({"signing_key": b"1234"}, "signing_key"),
    ],
)
def test_codec_config_errors(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Codec(MsgpackSerializer(), **kwargs)


def test_unencodable_value_is_codec_error() -> None:
    codec = Codec(MsgpackSerializer())
    with pytest.raises(CodecError):
        codec.encode(KEY, object())
    with pytest.raises(CodecError):
        codec.encode(KEY, {"f": lambda: 1})
    with pytest.raises(CodecError):
        Codec(JsonSerializer()).encode(KEY, {1, 2})


@pytest.mark.parametrize("kind", ["datetime", "time"])
def test_sub_second_utc_offset_round_trips(kind: str) -> None:
    """timezone() accepts any offset under a day, microseconds included; the value must come back
    as the same instant (CPython 3.11's fromisoformat reads "+00:00:00.000001" as UTC)."""
    import datetime as dt

    tz = dt.timezone(dt.timedelta(microseconds=1))
    value: Any = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=tz) if kind == "datetime" else dt.time(7, 8, 9, tzinfo=tz)
    codec = Codec(MsgpackSerializer())
    back = codec.decode(KEY, codec.encode(KEY, value))
    assert back.utcoffset() == value.utcoffset()
    assert back == value


@pytest.mark.parametrize(
    "n", [2**64, -(2**63) - 1, 2**20000, -(2**20000) + 7], ids=["2^64", "-2^63-1", "2^20000", "-2^20000+7"]
)
def test_int_of_any_size_round_trips(n: int) -> None:
    """The docstring promises int of any size, including past int->str's 4300-digit limit."""
    for codec in (Codec(MsgpackSerializer()), Codec(MsgpackSerializer(), compression=None)):
        assert codec.decode(KEY, codec.encode(KEY, n)) == n
        assert codec.decode(KEY, codec.encode(KEY, [n, (n,)])) == [n, (n,)]
