"""Value envelopes: a 4-byte header, an optional HMAC, and the serialized (maybe compressed) body.

Layout of every value tiercache writes to Redis::

    byte 0   MAGIC (0xC7)
    byte 1   envelope format version (1)
    byte 2   serializer ident (1 msgpack, 2 json, 3 pickle, 16-255 custom)
    byte 3   flags: bits 0-1 compression (0 none, 1 zlib, 2 zstd), bit 2 signed
    [32 bytes HMAC-SHA256(signing_key, redis_key || 0x00 || header || body), if signed]
    body

Invariant 6: bytes that do not parse (wrong magic, version, serializer or compression, a bad
or missing signature where one is required, a body the serializer rejects) raise CodecError,
which the read path turns into a miss. Nothing from Redis is unpickled unless the cache was
configured with the pickle serializer *and* a signing key, and the signature verified.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import hmac
import importlib
import json
import math
import pickle
import sys
import threading
import typing
import uuid
import zlib
import zoneinfo
from typing import Any

import msgpack

from .errors import CodecError, ConfigError, ValueTooLargeError

__all__ = [
    "Codec",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
]

MAGIC = 0xC7
ENVELOPE_VERSION = 1
HEADER_LEN = 4
MAC_LEN = 32
_SIGNED = 0b100
_COMPRESSION_MASK = 0b11
_NONE, _ZLIB, _ZSTD = 0, 1, 2


class MsgpackSerializer:
    """The default serializer: msgpack plus extension types; it cannot execute code.

    A value read back from Redis has the same type and value as the one stored (what L1
    returns): None, bool, int (any size), float, str (lone surrogates too), bytes, bytearray,
    list, tuple, dict (any hashable keys, in order), set, frozenset, OrderedDict, Counter,
    defaultdict (of a builtin factory), datetime, date, time (naive, a fixed offset or a
    ``ZoneInfo``; ``fold`` kept), timedelta, Decimal, UUID, numeric and string numpy arrays
    and scalars, and, by registered class only, dataclasses, pydantic models, namedtuples and
    enums. Anything that would come back different (a subclass of a builtin, a masked array,
    a datetime with another tzinfo class, ...) is refused when it is encoded, never stored
    changed. A class is registered by :meth:`register`, by appearing in a ``@tiered``
    function's return annotation, or by being encoded once in this process. Bytes naming a
    class that is not registered decode to a CodecError (a miss), never to an import.
    """

    ident = 1
    name = "msgpack"
    requires_signature = False

    def __init__(self) -> None:
        self._types: dict[str, type] = {}
        self._lock = threading.Lock()

    def register(self, *classes: type) -> None:
        """Allow these dataclass, pydantic, namedtuple or enum classes to be decoded."""
        for cls in classes:
            if not _is_registrable(cls):
                raise ConfigError(f"register({cls!r}): only dataclasses, pydantic models, namedtuples and enums")
            with self._lock:
                self._types[_class_name(cls)] = cls

    def register_annotation(self, annotation: Any) -> None:
        """Register every dataclass, pydantic model, namedtuple and enum found in a type annotation."""
        for cls in _classes_in(annotation):
            self.register(cls)

    def dumps(self, value: Any) -> bytes:
        data: bytes = msgpack.packb(
            value, default=self._default, strict_types=True, use_bin_type=True, unicode_errors="surrogatepass"
        )
        # msgpack writes a bytearray or memoryview as bin, which reads back as bytes, without
        # asking ``default``. Only a body with a bin header byte can hold one: look for them
        # then (a C-speed scan), in the lists and dicts msgpack walks itself (every other
        # container is packed through dumps again, which looks inside it).
        if (b"\xc4" in data or b"\xc5" in data or b"\xc6" in data) and _has_buffer(value):
            data = msgpack.packb(
                _swap_buffers(value),
                default=self._default,
                strict_types=True,
                use_bin_type=True,
                unicode_errors="surrogatepass",
            )
        return data

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data, ext_hook=self._ext_hook, strict_map_key=False, raw=False, unicode_errors="surrogatepass"
        )

    def _default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            return msgpack.ExtType(1, self.dumps(list(obj)))
        if t is int:  # out of the 64-bit range msgpack handles natively
            return msgpack.ExtType(12, b"%x" % obj)  # hex: no decimal digit limit
        if isinstance(obj, enum.Enum):
            self._learn(t)
            return msgpack.ExtType(14, self.dumps([_class_name(t), obj.value]))
        if t is dt.datetime or t is dt.time:
            return msgpack.ExtType(2 if t is dt.datetime else 4, self.dumps(_clock_fields(obj)))
        if t is dt.date:
            return msgpack.ExtType(3, obj.isoformat().encode())
        if t is dt.timedelta:
            return msgpack.ExtType(5, self.dumps([obj.days, obj.seconds, obj.microseconds]))
        if t is decimal.Decimal:
            return msgpack.ExtType(6, str(obj).encode())
        if t is uuid.UUID:
            return msgpack.ExtType(7, obj.bytes)
        if t is set or t is frozenset:
            return msgpack.ExtType(8 if t is set else 9, self.dumps(list(obj)))
        if t is collections.OrderedDict or t is collections.Counter:
            return msgpack.ExtType(19 if t is collections.OrderedDict else 20, self.dumps(dict(obj)))
        if t is collections.defaultdict:
            factory = obj.default_factory
            if factory is not None and _FACTORIES.get(getattr(factory, "__name__", None)) is not factory:
                raise TypeError(
                    f"a defaultdict whose default_factory is {factory!r} cannot be stored (only None or "
                    f"one of {', '.join(sorted(_FACTORIES))}): return dict(value), or use PickleSerializer"
                )
            return msgpack.ExtType(21, self.dumps([None if factory is None else factory.__name__, dict(obj)]))
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, (numpy.ndarray, numpy.generic)):
            return self._numpy(numpy, obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._learn(t)
            # Every field (init=False ones too) and any other instance attribute: the value is
            # rebuilt with that state, without running __init__ or __post_init__ again.
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            extra = {k: v for k, v in getattr(obj, "__dict__", {}).items() if k not in fields}
            return msgpack.ExtType(10, self.dumps([_class_name(t), fields, extra]))
        if _is_pydantic_class(t):
            self._learn(t)
            # The model's state as pydantic pickles it (field values by name, extras, the set
            # of fields set, private attributes), not model_dump: a dump drops excluded fields,
            # adds computed ones and uses names where validation wants aliases.
            state = obj.__getstate__()
            parts = [state["__dict__"], state["__pydantic_extra__"], state["__pydantic_fields_set__"]]
            return msgpack.ExtType(11, self.dumps([_class_name(t), *parts, state["__pydantic_private__"]]))
        if _is_namedtuple(t):
            self._learn(t)
            return msgpack.ExtType(16, self.dumps([_class_name(t), list(obj)]))
        for base in (dict, list, tuple, set, frozenset, str, bytes, bytearray, float, int, complex):
            if isinstance(obj, base) and t is not base:
                raise TypeError(
                    f"{_class_name(t)} is a subclass of {base.__name__}, which would come back from Redis "
                    f"as a plain {base.__name__}: return a plain {base.__name__} (or a namedtuple, dataclass "
                    "or pydantic model), or use PickleSerializer"
                )
        raise TypeError(f"msgpack serializer cannot encode a {t.__qualname__}")

    def _numpy(self, numpy: Any, obj: Any) -> msgpack.ExtType:
        t = type(obj)
        kind = obj.dtype.kind
        if kind not in _NUMPY_KINDS:
            raise TypeError(
                f"msgpack serializer stores numpy values of numeric, datetime and string dtypes only, "
                f"not dtype {obj.dtype} (object and structured dtypes need PickleSerializer)"
            )
        if isinstance(obj, numpy.ndarray):
            if t is not numpy.ndarray:
                raise TypeError(
                    f"{_class_name(t)} is a subclass of numpy.ndarray, which would come back as a plain "
                    "ndarray (a masked array without its mask): return a plain array (and the mask "
                    "separately), or use PickleSerializer"
                )
            data = numpy.ascontiguousarray(obj).tobytes()
            fields: list[Any] = [obj.dtype.str, list(obj.shape), data]
            if not obj.flags.writeable:
                fields.append(False)  # read-only comes back read-only, writable writable
            return msgpack.ExtType(15, self.dumps(fields))
        if t is not obj.dtype.type:
            raise TypeError(f"{_class_name(t)} is a subclass of a numpy scalar type: use PickleSerializer")
        # Strings by value: a fixed-width buffer would drop trailing NULs the scalar keeps.
        payload = obj[:] if kind in "SU" else obj.tobytes()  # [:]: the plain str or bytes
        return msgpack.ExtType(18, self.dumps([obj.dtype.str, payload]))

    def _learn(self, cls: type) -> None:
        name = _class_name(cls)
        if name not in self._types:
            with self._lock:
                self._types[name] = cls

    def _registered(self, name: str) -> type:
        try:
            return self._types[name]
        except KeyError:
            raise CodecError(
                f"value names class {name!r}, which is not registered with the serializer: "
                "register it with serializer.register(cls) or name it in the return annotation"
            ) from None

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == 1:
            return tuple(self.loads(data))
        if code in (2, 4):
            return _clock_value(dt.datetime if code == 2 else dt.time, self.loads(data))
        if code == 3:
            return dt.date.fromisoformat(data.decode())
        if code == 5:
            days, seconds, micros = self.loads(data)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == 6:
            return decimal.Decimal(data.decode())
        if code == 7:
            return uuid.UUID(bytes=data)
        if code == 8:
            return set(self.loads(data))
        if code == 9:
            return frozenset(self.loads(data))
        if code == 12:
            return int(data.decode(), 16)
        if code == 15:
            return _decode_array(self.loads(data))
        if code == 17:
            return bytearray(data)
        if code == 18:
            return _decode_scalar(self.loads(data))
        if code == 19:
            return collections.OrderedDict(self.loads(data))
        if code == 20:
            return collections.Counter(self.loads(data))
        if code == 21:
            factory_name, items = self.loads(data)
            return collections.defaultdict(None if factory_name is None else _FACTORIES[factory_name], items)
        if code in (10, 11, 14, 16):
            name, *payload = self.loads(data)
            cls: Any = self._registered(name)
            if code == 10 and dataclasses.is_dataclass(cls) and isinstance(cls, type):
                return _decode_dataclass(cls, payload)
            if code == 11 and _is_pydantic_class(cls):
                return _decode_pydantic(cls, payload)
            if code == 14 and issubclass(cls, enum.Enum):
                return cls(*payload)
            if code == 16 and _is_namedtuple(cls):
                return cls._make(*payload)
        raise CodecError(f"unknown msgpack extension type {code}")


def _has_buffer(obj: Any) -> bool:
    """Whether a bytearray or memoryview is in ``obj`` or the lists and dicts in it."""
    t = type(obj)
    if t is bytearray or t is memoryview:
        return True
    if t is list:
        return any(map(_has_buffer, obj))
    if t is dict:
        return any(map(_has_buffer, obj)) or any(map(_has_buffer, obj.values()))
    return False


def _swap_buffers(obj: Any) -> Any:
    """``obj`` with every bytearray (in it, or in its lists and dicts) as extension 17."""
    t = type(obj)
    if t is bytearray:
        return msgpack.ExtType(17, bytes(obj))
    if t is memoryview:
        raise TypeError("a memoryview borrows another object's memory: return bytes(view) or bytearray(view)")
    if t is list:
        return [_swap_buffers(x) for x in obj]
    if t is dict:
        return {_swap_buffers(k): _swap_buffers(v) for k, v in obj.items()}
    return obj


# Fixed-size dtypes whose bytes are the value: bool, ints, floats, complex, datetime64,
# timedelta64, bytes and str. Object and structured arrays would need pickle.
_NUMPY_KINDS = frozenset("biufcmMSU")

# The default_factory values a stored defaultdict may have (a name read from Redis is never imported).
_FACTORIES: dict[Any, Any] = {
    f.__name__: f for f in (list, dict, set, frozenset, tuple, int, float, str, bytes, bool, bytearray)
}


def _decode_array(fields: Any) -> Any:
    """A numpy array stored by the msgpack serializer: dtype string, shape, raw bytes, and
    ``False`` if it was read-only. It comes back writable or read-only as it was stored (L1
    hands out the stored object itself, so an L2 hit must agree with it), C-contiguous."""
    numpy = _numpy_or_error()
    dtype_str, shape, raw, *flags = fields
    dtype = numpy.dtype(dtype_str)
    if dtype.kind not in _NUMPY_KINDS:
        raise CodecError(f"numpy array of dtype {dtype_str!r} refused: numeric, datetime and string dtypes only")
    count = math.prod(shape)
    if count * dtype.itemsize != len(raw):
        raise CodecError(f"numpy array of shape {shape} and dtype {dtype_str} does not match its {len(raw)} bytes")
    array = numpy.frombuffer(raw, dtype=dtype).reshape(shape)  # read-only: it shares ``raw``
    return array if flags == [False] else array.copy()


def _decode_scalar(fields: Any) -> Any:
    numpy = _numpy_or_error()
    dtype_str, payload = fields
    dtype = numpy.dtype(dtype_str)
    if dtype.kind not in _NUMPY_KINDS:
        raise CodecError(f"numpy scalar of dtype {dtype_str!r} refused: numeric, datetime and string dtypes only")
    if dtype.kind in "SU":
        return dtype.type(payload)
    if len(payload) != dtype.itemsize:
        raise CodecError(f"numpy scalar of dtype {dtype_str} does not match its {len(payload)} bytes")
    return numpy.frombuffer(payload, dtype=dtype)[0]


def _numpy_or_error() -> Any:
    try:
        import numpy  # noqa: PLC0415 - optional, and only when an array is read
    except ImportError:
        raise CodecError("value is a numpy array or scalar, but numpy is not installed here") from None
    return numpy


def _decode_dataclass(cls: Any, payload: list[Any]) -> Any:
    if len(payload) == 1:  # written by tiercache < 0.x: the init fields only
        return cls(**payload[0])
    fields, extra = payload
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise CodecError(f"stored fields of {_class_name(cls)} do not match its fields {sorted(names)}")
    obj = object.__new__(cls)
    for name, value in (*fields.items(), *extra.items()):
        object.__setattr__(obj, name, value)  # frozen dataclasses too
    return obj


def _decode_pydantic(cls: Any, payload: list[Any]) -> Any:
    if len(payload) == 1:  # written by tiercache < 0.x: model_dump()
        return cls.model_validate(payload[0])
    fields, extra, fields_set, private = payload
    if set(fields) != set(cls.model_fields):
        raise CodecError(f"stored fields of {_class_name(cls)} do not match its fields {sorted(cls.model_fields)}")
    obj = cls.__new__(cls)
    state = {
        "__dict__": fields,
        "__pydantic_extra__": extra,
        "__pydantic_fields_set__": set(fields_set),
        "__pydantic_private__": private,
    }
    obj.__setstate__(state)
    return obj


def _clock_fields(obj: dt.datetime | dt.time) -> list[Any]:
    """[wall time in ISO format, UTC offset in microseconds or None], then, only if needed,
    the zone (``["zoneinfo", key]`` or ``["name", tzname]`` of a named fixed offset) and fold.

    The offset is exact (isoformat loses sub-second offsets). A tzinfo that is neither a
    ``datetime.timezone`` nor a ``ZoneInfo`` with a key would come back as another class
    (pytz, dateutil): refused."""
    tz = obj.tzinfo
    zone: list[str] | None = None
    if type(tz) is dt.timezone:
        offset = tz.utcoffset(None)
        name = tz.tzname(None)
        if name != dt.timezone(offset).tzname(None):
            zone = ["name", name]
    elif type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        zone = ["zoneinfo", tz.key]
    elif tz is not None:
        raise TypeError(
            f"a {type(obj).__name__} with a tzinfo of type {_class_name(type(tz))} would come back with "
            "another tzinfo class: convert it to datetime.timezone.utc or a zoneinfo.ZoneInfo, "
            "or use PickleSerializer"
        )
    offset_us = _offset_us(obj)
    fields: list[Any] = [obj.replace(tzinfo=None, fold=0).isoformat(), offset_us]
    if zone is not None or obj.fold:
        fields += [zone, obj.fold]
    return fields


def _clock_value(kind: type[dt.datetime] | type[dt.time], fields: list[Any]) -> Any:
    text, offset, *rest = fields
    zone, fold = rest if rest else (None, 0)
    if zone is None:
        tz = _zone(offset)
    elif zone[0] == "zoneinfo":
        tz = zoneinfo.ZoneInfo(zone[1])
    elif zone[0] == "name" and offset is not None:
        tz = dt.timezone(dt.timedelta(microseconds=offset), zone[1])
    else:
        raise CodecError(f"unknown time zone {zone!r}")
    value = kind.fromisoformat(text).replace(tzinfo=tz, fold=fold)
    if _offset_us(value) != offset:  # another tz database here: not the instant that was stored
        raise CodecError(f"time zone {zone!r} has another UTC offset here than where the value was stored")
    return value


class JsonSerializer:
    """Plain JSON (None, bool, int, float, str, list, dict with str keys); tuples come back as lists."""

    ident = 2
    name = "json"
    requires_signature = False

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class PickleSerializer:
    """Pickle, for values nothing else can encode. Opt-in only, and only with a signing key.

    Every payload is signed with HMAC-SHA256 bound to its Redis key; unsigned or badly signed
    bytes are never unpickled (anyone who can write to Redis could otherwise run code in
    every process that reads the key).
    """

    ident = 3
    name = "pickle"
    requires_signature = True

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301 - only reached after the HMAC verified


def _offset_us(obj: dt.datetime | dt.time) -> int | None:
    """The UTC offset in microseconds (exactly: isoformat loses sub-second offsets), or None."""
    offset = obj.utcoffset()
    return None if offset is None else offset // dt.timedelta(microseconds=1)


def _zone(offset_us: int | None) -> dt.tzinfo | None:
    return None if offset_us is None else dt.timezone(dt.timedelta(microseconds=offset_us))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_pydantic_class(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "model_validate") and hasattr(cls, "model_fields")


def _is_namedtuple(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make")


def _is_registrable(cls: Any) -> bool:
    return isinstance(cls, type) and (
        dataclasses.is_dataclass(cls) or _is_pydantic_class(cls) or _is_namedtuple(cls) or issubclass(cls, enum.Enum)
    )


def _classes_in(annotation: Any) -> list[type]:
    found: list[type] = []
    stack = [annotation]
    seen: set[int] = set()
    while stack:
        ann = stack.pop()
        if id(ann) in seen:
            continue
        seen.add(id(ann))
        if _is_registrable(ann):
            found.append(ann)
            if dataclasses.is_dataclass(ann) or _is_namedtuple(ann):
                with contextlib.suppress(Exception):  # unresolvable hints only lose auto-registration
                    stack.extend(typing.get_type_hints(ann).values())
            elif _is_pydantic_class(ann):
                stack.extend(f.annotation for f in ann.model_fields.values())
        stack.extend(typing.get_args(ann))
    return found


def _zstd() -> Any:
    try:
        return importlib.import_module("zstandard")  # optional: pip install 'tiercache[zstd]'
    except ImportError:
        return None


class Envelope(bytes):
    """The bytes :meth:`Codec.encode` returns; ``held`` is the size L1 counts for the value."""

    held: int


class Codec:
    """Encodes values into envelopes and decodes them back, for one cache configuration.

    :meth:`held_size` is what ``l1_maxbytes`` counts for a value: the length of its serialized
    body before compression, a cheap stand-in for the memory the decoded value takes in this
    process (a string, bytes or an array takes about that; compressed bytes may be 1000 times
    smaller). It is known, without extra work, right after ``encode`` or ``decode``.
    """

    def __init__(
        self,
        serializer: Any,
        *,
        signing_key: bytes | None = None,
        compression: str | None = "auto",
        compress_threshold: int = 1024,
        max_value_bytes: int | None = None,
        max_decoded_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if serializer.requires_signature and not signing_key:
            raise ConfigError(
                f"serializer={serializer.name!r} executes code when loading, so it needs "
                "signing_key=<secret bytes> (HMAC-SHA256): unsigned bytes from Redis are refused"
            )
        if signing_key is not None and (not isinstance(signing_key, bytes) or len(signing_key) < 16):
            raise ConfigError("signing_key must be bytes of at least 16 random bytes (e.g. os.urandom(32))")
        if compression not in ("auto", "zlib", "zstd", None):
            raise ConfigError(f"compression={compression!r}: use 'auto', 'zlib', 'zstd' or None")
        self._zstd = _zstd()
        if compression == "zstd" and self._zstd is None:
            raise ConfigError("compression='zstd' needs the zstandard package: pip install 'tiercache[zstd]'")
        if compression == "auto":
            compression = "zstd" if self._zstd is not None else "zlib"
        self._compression = {None: _NONE, "zlib": _ZLIB, "zstd": _ZSTD}[compression]
        if compress_threshold < 0:
            raise ConfigError(f"compress_threshold={compress_threshold!r} must be >= 0 (bytes)")
        if max_value_bytes is not None and max_value_bytes <= 0:
            raise ConfigError(f"max_value_bytes={max_value_bytes!r} must be a positive byte count or None")
        self.serializer = serializer
        self._key = signing_key
        self._threshold = compress_threshold
        self._max_value = max_value_bytes
        self._max_decoded = max_decoded_bytes
        self._zstd_c = self._zstd.ZstdCompressor(level=3) if self._zstd is not None else None
        # A ZstdDecompressor costs ~10 us to make and must not be shared between threads.
        self._per_thread = threading.local()
        self._lock = threading.Lock()  # zstandard compressor objects are not thread-safe

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks (another thread may have held one at the fork)."""
        self._lock = threading.Lock()
        self._zstd_c = self._zstd.ZstdCompressor(level=3) if self._zstd is not None else None
        self._per_thread = threading.local()
        if isinstance(getattr(self.serializer, "_lock", None), type(self._lock)):
            self.serializer._lock = threading.Lock()

    def encode(self, key: str, value: Any) -> bytes:
        """The envelope for ``value`` under ``key``; CodecError if it cannot be encoded."""
        try:
            body: bytes = self.serializer.dumps(value)
        except CodecError:
            raise
        except Exception as exc:  # any serializer failure means "not cacheable"
            name = self.serializer.name
            raise CodecError(f"cannot serialize a {type(value).__qualname__} with {name}: {exc}") from exc
        held = len(body)
        flags = _NONE
        if self._compression and len(body) >= self._threshold:
            packed = self._compress(body)
            if len(packed) < len(body):
                body, flags = packed, self._compression
        if self._max_value is not None and len(body) > self._max_value:
            raise ValueTooLargeError(
                f"value for {key} is {len(body)} bytes encoded, above max_value_bytes={self._max_value}"
            )
        if self._key is not None:
            flags |= _SIGNED
        header = bytes((MAGIC, ENVELOPE_VERSION, self.serializer.ident, flags))
        envelope = Envelope(header + body if self._key is None else header + self._mac(key, header, body) + body)
        envelope.held = held
        return envelope

    def held_size(self, data: bytes) -> int:
        """The size ``l1_maxbytes`` counts for the value in ``data``: its serialized length
        before compression. O(1) for what :meth:`encode` returned and for the bytes this
        thread last decoded; other envelopes are measured (a zlib body is decompressed)."""
        held = getattr(data, "held", None)
        if held is not None:
            return int(held)
        last = getattr(self._per_thread, "decoded", None)
        if last is not None and last[0] is data:
            self._per_thread.decoded = None
            return int(last[1])
        if len(data) < HEADER_LEN:
            return len(data)
        flags = data[3]
        start = HEADER_LEN + (MAC_LEN if flags & _SIGNED else 0)
        compression = flags & _COMPRESSION_MASK
        if compression == _ZSTD and self._zstd is not None:
            declared = int(self._zstd.frame_content_size(data[start:]))
            if declared >= 0:
                return declared
        if compression:
            with contextlib.suppress(CodecError):
                return len(self._decompress("?", compression, data[start:]))
        return max(0, len(data) - start)

    def decode(self, key: str, data: bytes) -> Any:
        """The value in ``data``; CodecError for anything unknown, corrupt or unsigned."""
        if len(data) < HEADER_LEN or data[0] != MAGIC or data[1] != ENVELOPE_VERSION:
            raise CodecError(f"{key}: not a tiercache envelope (or another format version)")
        ident, flags = data[2], data[3]
        if ident != self.serializer.ident:
            raise CodecError(f"{key}: written with serializer {ident}, configured {self.serializer.ident}")
        if flags & ~(_SIGNED | _COMPRESSION_MASK):
            raise CodecError(f"{key}: unknown envelope flags {flags:#x}")
        body_at = HEADER_LEN
        if flags & _SIGNED:
            if self._key is None:
                raise CodecError(f"{key}: value is signed but no signing_key is configured")
            body_at += MAC_LEN
            mac = data[HEADER_LEN:body_at]
            if not hmac.compare_digest(mac, self._mac(key, data[:HEADER_LEN], data[body_at:])):
                raise CodecError(f"{key}: signature does not match (tampered, or another signing_key)")
        elif self._key is not None or self.serializer.requires_signature:
            raise CodecError(f"{key}: value is not signed but a signature is required")
        body = data[body_at:]
        compression = flags & _COMPRESSION_MASK
        if compression:
            body = self._decompress(key, compression, body)
        try:
            value = self.serializer.loads(body)
        except CodecError:
            raise
        except Exception as exc:  # garbage from Redis is a miss, whatever it raises
            raise CodecError(f"{key}: cannot decode body with {self.serializer.name}: {repr(exc)[:200]}") from exc
        self._per_thread.decoded = (data, len(body))  # for held_size(data), next on this thread
        return value

    def _mac(self, key: str, header: bytes, body: bytes) -> bytes:
        assert self._key is not None
        m = hmac.new(self._key, key.encode("utf-8", "surrogatepass"), hashlib.sha256)
        m.update(b"\x00")
        m.update(header)
        m.update(body)
        return m.digest()

    def _compress(self, body: bytes) -> bytes:
        if self._compression == _ZSTD:
            with self._lock:
                return bytes(self._zstd_c.compress(body))  # type: ignore[union-attr]
        return zlib.compress(body, 1)

    def _decompress(self, key: str, compression: int, body: bytes) -> bytes:
        try:
            if compression == _ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(body, self._max_decoded)
                if d.unconsumed_tail:
                    raise CodecError(f"{key}: decompressed value exceeds {self._max_decoded} bytes")
                if not d.eof or d.unused_data:
                    raise CodecError(f"{key}: zlib body is truncated or has trailing bytes")
                return bytes(out)
            if compression == _ZSTD and self._zstd is not None:
                declared = self._zstd.frame_content_size(body)
                if 0 <= declared <= self._max_decoded:
                    # One shot into a buffer of the declared size (our frames declare it);
                    # a frame whose data outgrows its declaration is an error, not a bomb.
                    decompressor = getattr(self._per_thread, "zstd", None)
                    if decompressor is None:
                        decompressor = self._per_thread.zstd = self._zstd.ZstdDecompressor()
                    out = decompressor.decompress(body, max_output_size=declared, allow_extra_data=False)
                    if len(out) != declared:
                        raise CodecError(f"{key}: zstd body does not match its declared size")
                    return bytes(out)
                # Unknown or huge declared size: a stream reader honours the limit anyway.
                reader = self._zstd.ZstdDecompressor().stream_reader(body)
                chunks: list[bytes] = []
                total = 0
                while chunk := reader.read(min(1 << 20, self._max_decoded + 1 - total)):
                    total += len(chunk)
                    if total > self._max_decoded:
                        raise CodecError(f"{key}: decompressed value exceeds {self._max_decoded} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"{key}: corrupt compressed body: {exc!r}") from exc
        raise CodecError(f"{key}: compression {compression} is not available here")
