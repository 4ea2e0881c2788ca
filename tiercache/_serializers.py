"""Serializers: how a value becomes the body of an envelope (see ``_codec``) and back.

``MsgpackSerializer`` (the default) stores what comes back as what went in, or refuses it at
store time; ``JsonSerializer`` converts silently (documented); ``PickleSerializer`` needs a
signing key (enforced by ``Codec``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import pickle
import sys
import threading
import typing
import uuid
import zoneinfo
from typing import Any

import msgpack

from .errors import CodecError, ConfigError

__all__ = ["JsonSerializer", "MsgpackSerializer", "PickleSerializer"]


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

    def _default(self, obj: Any) -> Any:  # noqa: C901, PLR0911, PLR0912 - a type dispatcher: one branch per extension type
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

    def _ext_hook(self, code: int, data: bytes) -> Any:  # noqa: C901, PLR0911, PLR0912 - a dispatcher: one branch per extension code
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
