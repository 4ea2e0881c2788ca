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

    Supports None, bool, int (any size), float, str, bytes, list, tuple, dict (any hashable
    keys), set, frozenset, datetime, date, time, timedelta, Decimal, UUID, and — by
    registered class only — dataclasses, pydantic models and enums. A class is registered
    by :meth:`register`, by appearing in a ``@tiered`` function's return annotation, or by
    being encoded once in this process. Bytes naming a class that is not registered decode
    to a CodecError (a miss), never to an import.
    """

    ident = 1
    name = "msgpack"
    requires_signature = False

    def __init__(self) -> None:
        self._types: dict[str, type] = {}
        self._lock = threading.Lock()

    def register(self, *classes: type) -> None:
        """Allow these dataclass, pydantic or enum classes to be decoded."""
        for cls in classes:
            if not (
                dataclasses.is_dataclass(cls)
                or _is_pydantic_class(cls)
                or (isinstance(cls, type) and issubclass(cls, enum.Enum))
            ):
                raise ConfigError(f"register({cls!r}): only dataclasses, pydantic models and enums")
            with self._lock:
                self._types[_class_name(cls)] = cls

    def register_annotation(self, annotation: Any) -> None:
        """Register every dataclass, pydantic model and enum found in a type annotation."""
        for cls in _classes_in(annotation):
            self.register(cls)

    def dumps(self, value: Any) -> bytes:
        data: bytes = msgpack.packb(value, default=self._default, strict_types=True, use_bin_type=True)
        return data

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, strict_map_key=False, raw=False)

    def _default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            return msgpack.ExtType(1, self.dumps(list(obj)))
        if t is int:  # out of the 64-bit range msgpack handles natively
            return msgpack.ExtType(12, b"%x" % obj)  # hex: no decimal digit limit
        if isinstance(obj, enum.Enum):
            self._learn(t)
            return msgpack.ExtType(14, self.dumps([_class_name(t), obj.value]))
        if t is dt.datetime:
            return msgpack.ExtType(2, self.dumps([obj.replace(tzinfo=None).isoformat(), _offset_us(obj)]))
        if t is dt.date:
            return msgpack.ExtType(3, obj.isoformat().encode())
        if t is dt.time:
            return msgpack.ExtType(4, self.dumps([obj.replace(tzinfo=None).isoformat(), _offset_us(obj)]))
        if t is dt.timedelta:
            return msgpack.ExtType(5, self.dumps([obj.days, obj.seconds, obj.microseconds]))
        if t is decimal.Decimal:
            return msgpack.ExtType(6, str(obj).encode())
        if t is uuid.UUID:
            return msgpack.ExtType(7, obj.bytes)
        if t is set or t is frozenset:
            return msgpack.ExtType(8 if t is set else 9, self.dumps(list(obj)))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._learn(t)
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
            return msgpack.ExtType(10, self.dumps([_class_name(t), fields]))
        if _is_pydantic_class(t):
            self._learn(t)
            return msgpack.ExtType(11, self.dumps([_class_name(t), obj.model_dump(mode="python")]))
        # Subclasses of builtins (OrderedDict, a str subclass, ...) are stored as the builtin.
        for base in (dict, list, str, bytes, float, int):
            if isinstance(obj, base):
                return base(obj)  # type: ignore[arg-type]
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            if isinstance(obj, numpy.ndarray):
                if obj.dtype.kind not in _NUMPY_KINDS:
                    raise TypeError(f"msgpack serializer stores numeric numpy arrays only, not dtype {obj.dtype}")
                data = numpy.ascontiguousarray(obj).tobytes()
                return msgpack.ExtType(15, self.dumps([obj.dtype.str, list(obj.shape), data]))
            if isinstance(obj, numpy.generic) and obj.dtype.kind in _NUMPY_KINDS:
                return obj.item()  # a numpy scalar: stored as the Python number
        raise TypeError(f"msgpack serializer cannot encode a {t.__qualname__}")

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
        if code == 2:
            text, offset = self.loads(data)
            return dt.datetime.fromisoformat(text).replace(tzinfo=_zone(offset))
        if code == 3:
            return dt.date.fromisoformat(data.decode())
        if code == 4:
            text, offset = self.loads(data)
            return dt.time.fromisoformat(text).replace(tzinfo=_zone(offset))
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
        if code in (10, 11, 14):
            name, payload = self.loads(data)
            cls: Any = self._registered(name)
            if code == 10 and dataclasses.is_dataclass(cls) and isinstance(cls, type):
                return cls(**payload)
            if code == 11 and _is_pydantic_class(cls):
                return cls.model_validate(payload)
            if code == 14 and issubclass(cls, enum.Enum):
                return cls(payload)
        raise CodecError(f"unknown msgpack extension type {code}")


# Numeric dtypes only (bool, ints, floats, complex): an object array would need pickle.
_NUMPY_KINDS = frozenset("biufc")


def _decode_array(fields: Any) -> Any:
    """A numpy array stored by the msgpack serializer: dtype string, shape, raw bytes. Read-only
    (it shares the bytes it was decoded from, and L1 hands the same object to every caller)."""
    try:
        import numpy  # noqa: PLC0415 - optional, and only when an array is read
    except ImportError:
        raise CodecError("value is a numpy array, but numpy is not installed here") from None
    dtype_str, shape, raw = fields
    dtype = numpy.dtype(dtype_str)
    if dtype.kind not in _NUMPY_KINDS:
        raise CodecError(f"numpy array of dtype {dtype_str!r} refused: numeric dtypes only")
    count = math.prod(shape)
    if count * dtype.itemsize != len(raw):
        raise CodecError(f"numpy array of shape {shape} and dtype {dtype_str} does not match its {len(raw)} bytes")
    return numpy.frombuffer(raw, dtype=dtype).reshape(shape)


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
    """The UTC offset in microseconds (exactly: isoformat loses sub-second offsets), or None.

    A named zone (ZoneInfo) is stored as its offset at that moment: the value comes back with
    a fixed-offset timezone, the same instant and wall time."""
    offset = obj.utcoffset()
    return None if offset is None else offset // dt.timedelta(microseconds=1)


def _zone(offset_us: int | None) -> dt.tzinfo | None:
    return None if offset_us is None else dt.timezone(dt.timedelta(microseconds=offset_us))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_pydantic_class(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "model_validate") and hasattr(cls, "model_fields")


def _classes_in(annotation: Any) -> list[type]:
    found: list[type] = []
    stack = [annotation]
    seen: set[int] = set()
    while stack:
        ann = stack.pop()
        if id(ann) in seen:
            continue
        seen.add(id(ann))
        if isinstance(ann, type) and (
            dataclasses.is_dataclass(ann) or _is_pydantic_class(ann) or issubclass(ann, enum.Enum)
        ):
            found.append(ann)
            if dataclasses.is_dataclass(ann):
                with contextlib.suppress(Exception):  # unresolvable hints only lose auto-registration
                    stack.extend(typing.get_type_hints(ann).values())
            elif _is_pydantic_class(ann):
                stack.extend(f.annotation for f in ann.model_fields.values())  # type: ignore[attr-defined]
        stack.extend(typing.get_args(ann))
    return found


def _zstd() -> Any:
    try:
        return importlib.import_module("zstandard")  # optional: pip install 'tiercache[zstd]'
    except ImportError:
        return None


class Codec:
    """Encodes values into envelopes and decodes them back, for one cache configuration."""

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
        if self._key is None:
            return header + body
        return header + self._mac(key, header, body) + body

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
            return self.serializer.loads(body)
        except CodecError:
            raise
        except Exception as exc:  # garbage from Redis is a miss, whatever it raises
            raise CodecError(f"{key}: cannot decode body with {self.serializer.name}: {repr(exc)[:200]}") from exc

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
