"""The canonical, type-tagged encoding of call arguments, its xxh3-128 digest, and the keys of
JSON request bodies and LLM calls.

The same call must give the same Redis key in every process and every Python run, so nothing
here uses ``hash()`` (salted per process) or ``repr()`` of arbitrary objects. Every value is
written with a type tag and a length or terminator, so ``1``, ``"1"``, ``1.0``, ``True``,
``(1,)`` and ``[1]`` all encode differently, and no two distinct argument lists share bytes.
A subclass of a builtin is read through the builtin's own methods, never its overrides.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import struct
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from .errors import KeyEncodingError

__all__ = ["LLM_IGNORED", "canonical_bytes", "digest", "json_key", "llm_key", "normalize_json"]


#: Nesting deeper than this is refused with a KeyEncodingError (not a RecursionError): it
#: also stops an argument that contains itself.
_MAX_DEPTH = 100
_WHOLE = slice(None)


class _Unencodable(Exception):
    """Raised inside ``_encode``; each level it unwinds through adds its step (``[2]``,
    ``['tags']``, ``.field``), so the path to the bad value is built only when encoding fails."""

    def __init__(self, reason: str, *, verb: str = "cannot encode ") -> None:
        super().__init__(reason)
        self.reason = reason
        self.verb = verb
        self.steps: list[str] = []

    def error(self, where: str) -> KeyEncodingError:
        return KeyEncodingError(f"{self.verb}{where}{''.join(reversed(self.steps))} {self.reason}")


def _too_deep() -> _Unencodable:
    return _Unencodable(
        f"into a cache key: it is nested more than {_MAX_DEPTH} levels deep (or contains itself); "
        "pass a flatter value, define __tiercache_key__(self) on its class, or give tiered(..., key=...)"
    )


def _key_error(exc: Exception, where: str) -> KeyEncodingError:
    if isinstance(exc, _Unencodable):
        return exc.error(where)
    return _too_deep().error(where)  # a RecursionError: the caller's stack was already deep


def _safe_repr(obj: Any) -> str:
    """``repr(obj)`` for an error message, shortened; never raises (a broken ``__repr__`` must
    not replace the error being reported)."""
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001
        return f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _class_name(cls: type) -> bytes:
    # type's own descriptors: a metaclass cannot make two classes claim one name.
    return f"{_TYPE_MODULE(cls)}.{_TYPE_QUALNAME(cls)}".encode("utf-8", "surrogatepass")


_TYPE_MODULE = type.__dict__["__module__"].__get__
_TYPE_QUALNAME = type.__dict__["__qualname__"].__get__


def _encode(obj: Any, out: bytearray, depth: int) -> None:  # noqa: C901, PLR0912 - the L1-miss hot path: a branch per common type, exact checks first
    t = type(obj)
    # Exact-type checks first: the common cases, and bool before int (bool is an int).
    if t is str:
        b = obj.encode("utf-8", "surrogatepass")
        out += b"s%d:" % len(b)
        out += b
    elif t is int:
        out += b"i%x;" % obj  # hex: no int-to-decimal digit limit (sys.set_int_max_str_digits)
    elif t is bool:
        out += b"T" if obj else b"F"
    elif obj is None:
        out += b"N"
    elif t is float:
        if obj != obj:  # noqa: PLR0124 - NaN
            out += b"n"  # its own tag: "f" is always followed by exactly 8 bytes
        else:
            # -0.0 == 0.0 in Python, so they must share a key (the memo treats them as equal).
            out += b"f" + struct.pack(">d", obj + 0.0)
    elif t is bytes:
        out += b"b%d:" % len(obj)
        out += obj
    elif t is tuple or t is list:
        if depth >= _MAX_DEPTH:
            raise _too_deep()
        out += b"(%d:" % len(obj) if t is tuple else b"[%d:" % len(obj)
        try:
            for i, item in enumerate(obj):  # noqa: B007 - ``i`` is read by the except clause
                _encode(item, out, depth + 1)
        except _Unencodable as exc:
            exc.steps.append(f"[{i}]")
            raise
    elif t is dict:
        _encode_mapping(obj.items(), out, depth, b"{")
    elif t is set or t is frozenset:
        _encode_set(obj, out, depth, b"<" if t is set else b">")
    else:
        _encode_other(obj, out, depth)


def _encode_mapping(items: Iterable[tuple[Any, Any]], out: bytearray, depth: int, tag: bytes) -> None:
    if depth >= _MAX_DEPTH:
        raise _too_deep()
    depth += 1
    pairs = []
    for k, v in items:
        kb = bytearray()
        try:
            _encode(k, kb, depth)
        except _Unencodable as exc:
            exc.steps.append(f"[{_safe_repr(k)}] (key)")
            raise
        vb = bytearray()
        try:
            _encode(v, vb, depth)
        except _Unencodable as exc:
            exc.steps.append(f"[{_safe_repr(k)}]")
            raise
        pairs.append((bytes(kb), bytes(vb)))
    pairs.sort()
    out += tag + b"%d:" % len(pairs)
    for key_bytes, value_bytes in pairs:
        out += key_bytes
        out += value_bytes


def _encode_set(items: Iterable[Any], out: bytearray, depth: int, tag: bytes) -> None:
    if depth >= _MAX_DEPTH:
        raise _too_deep()
    parts = []
    try:
        for item in items:
            buf = bytearray()
            _encode(item, buf, depth + 1)
            parts.append(bytes(buf))
    except _Unencodable as exc:
        exc.steps.append("{…}")
        raise
    parts.sort()
    out += tag + b"%d:" % len(parts)
    for p in parts:
        out += p


def _nested(obj: Any, out: bytearray, depth: int, step: str) -> None:
    try:
        _encode(obj, out, depth + 1)
    except _Unencodable as exc:
        exc.steps.append(step)
        raise


def _tagged_name(out: bytearray, tag: bytes, cls: type) -> None:
    name = _class_name(cls)
    out += tag + b"%d:" % len(name) + name


def _base_attr(cls: type, name: str, obj: Any) -> Any:
    """``obj.name`` as ``cls`` defines it, whatever a subclass of ``cls`` overrides."""
    return cls.__dict__[name].__get__(obj, cls)


def _encode_other(obj: Any, out: bytearray, depth: int) -> None:  # noqa: C901, PLR0912, PLR0915 - a type dispatcher: one branch per supported key type, in order
    # Everything here reads values through the base class's own implementation
    # (``dt.date.isoformat(obj)``, not ``obj.isoformat()``): a subclass must not choose its key.
    if depth >= _MAX_DEPTH:
        raise _too_deep()
    t = type(obj)
    hook = getattr(t, "__tiercache_key__", None)
    if hook is not None:
        _tagged_name(out, b"H", t)
        _nested(hook(obj), out, depth, ".__tiercache_key__()")
    elif issubclass(t, enum.Enum):
        _tagged_name(out, b"E", t)
        _nested(obj._value_, out, depth, ".value")
    elif issubclass(t, dt.datetime):
        out += b"D" + dt.datetime.isoformat(obj).encode() + b";"
    elif issubclass(t, dt.date):
        out += b"d" + dt.date.isoformat(obj).encode() + b";"
    elif issubclass(t, dt.time):
        out += b"t" + dt.time.isoformat(obj).encode() + b";"
    elif issubclass(t, dt.timedelta):
        days, seconds, micro = (_base_attr(dt.timedelta, a, obj) for a in ("days", "seconds", "microseconds"))
        out += b"R%d,%d,%d;" % (days, seconds, micro)
    elif issubclass(t, decimal.Decimal):
        out += b"M" + decimal.Decimal.__str__(obj).encode() + b";"
    elif issubclass(t, uuid.UUID):
        out += b"U" + _base_attr(uuid.UUID, "int", obj).to_bytes(16, "big")
    elif t is memoryview:
        data = obj.tobytes()
        out += b"y%d:" % len(data) + data
    elif issubclass(t, bytearray):
        data = bytes(bytearray.__getitem__(obj, _WHOLE))
        out += b"y%d:" % len(data) + data
    elif issubclass(t, type):
        _tagged_name(out, b"C", obj)
    elif dataclasses.is_dataclass(obj):
        _tagged_name(out, b"A", t)
        dc_fields = dataclasses.fields(obj)
        out += b"%d:" % len(dc_fields)
        for f in dc_fields:
            _encode(f.name, out, depth)
            # The stored value, never through a __getattribute__ or property that masks it.
            _nested(object.__getattribute__(obj, f.name), out, depth, f".{f.name}")
    elif hasattr(t, "model_dump") and hasattr(t, "model_fields"):  # pydantic v2
        # Every field by its value (model_dump() would drop Field(exclude=True) fields and
        # apply custom serializers), and the extra fields; not private attributes. Tag "Q":
        # before, "P" held model_dump(), so no old entry is read as a new key.
        _tagged_name(out, b"Q", t)
        values = object.__getattribute__(obj, "__dict__")
        fields = {name: values[name] for name in t.model_fields if name in values}
        extra = getattr(obj, "__pydantic_extra__", None)
        if type(extra) is dict:
            fields.update(extra)
        _encode_mapping(fields.items(), out, depth, b"{")
    elif issubclass(t, _BUILTINS):
        # A subclass of a builtin: its class name, then its value as the builtin itself
        # sees it (never through the subclass's __str__, __int__, __iter__, items(), ...).
        # Tag "V": before, "S" held the value read through the subclass's overrides.
        _tagged_name(out, b"V", t)
        names = t.__dict__.get("_fields")  # a namedtuple's field names are part of its key
        if type(names) is tuple:
            _encode(names, out, depth + 1)
        _encode_builtin_value(obj, t, out, depth)
    else:
        raise _Unencodable(
            f"(a {t.__qualname__}) into a cache key: pass "
            "str/int/float/bool/None/bytes, tuples, lists, dicts, sets, datetimes, enums, "
            "dataclasses or pydantic models, define __tiercache_key__(self) on the class, "
            "or give tiered(..., key=...)"
        )


_BUILTINS = (str, int, float, bytes, tuple, list, dict, frozenset, set)


def _encode_builtin_value(obj: Any, t: type, out: bytearray, depth: int) -> None:
    # Each call returns an exact builtin copy of the raw value (or iterates the raw storage).
    if issubclass(t, str):
        _encode(str.__str__(obj), out, depth)
    elif issubclass(t, int):
        _encode(int.__index__(obj), out, depth)
    elif issubclass(t, float):
        _encode(float.__float__(obj), out, depth)
    elif issubclass(t, bytes):
        _encode(bytes.__getitem__(obj, _WHOLE), out, depth)
    elif issubclass(t, tuple):
        _encode(tuple.__getitem__(obj, _WHOLE), out, depth + 1)
    elif issubclass(t, list):
        _encode(list.__getitem__(obj, _WHOLE), out, depth + 1)
    elif issubclass(t, OrderedDict):
        # Order is part of an OrderedDict's equality: its pairs in order, not a sorted mapping.
        _encode(list(dict.items(obj)), out, depth + 1)
    elif issubclass(t, dict):
        _encode_mapping(dict.items(obj), out, depth + 1, b"{")
    elif issubclass(t, frozenset):
        _encode_set(frozenset.__iter__(obj), out, depth + 1, b">")
    else:
        _encode_set(set.__iter__(obj), out, depth + 1, b"<")


def canonical_bytes(value: Any, path: str = "value") -> bytes:
    """The canonical, type-tagged encoding of ``value`` (the input of :func:`digest`).

    Raises:
        KeyEncodingError: ``value`` holds something that cannot be encoded, is nested more
            than 100 levels deep, or contains itself; the message names the path to it.
    """
    out = bytearray()
    try:
        _encode(value, out, 0)
    except (_Unencodable, RecursionError) as exc:
        raise _key_error(exc, path) from None
    return bytes(out)


def digest(data: bytes) -> str:
    """xxh3-128 of ``data`` as 32 hex digits: stable across processes, platforms and runs."""
    return xxhash.xxh3_128_hexdigest(data)


#: Request fields that do not change an LLM's answer, left out of ``llm_key``.
LLM_IGNORED = frozenset({"stream", "stream_options", "user", "timeout", "request_timeout", "extra_headers", "metadata"})


def normalize_json(value: Any, path: str = "request") -> Any:
    """A JSON-like value in canonical form, for keys: mappings as dicts of string keys (their
    canonical encoding sorts them), lists and tuples as lists, floats that are whole numbers
    as ints (``1.0`` and ``1`` are the same JSON number), ``-0.0`` as ``0``, subclasses of
    str/int/float as their raw values. Raises KeyEncodingError for NaN, infinities,
    non-string mapping keys, nesting deeper than 100 levels (or a value that contains
    itself) and anything JSON cannot hold, naming where it is."""
    try:
        return _normalize_json(value, 0)
    except (_Unencodable, RecursionError) as exc:
        raise _key_error(exc, path) from None


def _normalize_json(value: Any, depth: int) -> Any:
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if issubclass(t, str):
        return str.__str__(value)
    if issubclass(t, int):
        return int.__index__(value)  # bool is handled above; a subclass gives its raw number
    if issubclass(t, float):
        value = float.__float__(value)
        if not math.isfinite(value):
            raise _Unencodable(f"is {value!r}: not a JSON number", verb="")
        return int(value) if value.is_integer() else value
    if depth >= _MAX_DEPTH:
        raise _too_deep()
    if issubclass(t, Mapping):
        return _normalize_json_object(value, t, depth)
    if issubclass(t, (list, tuple)):
        return _normalize_json_array(value, t, depth)
    raise _Unencodable(f"is a {t.__qualname__}: not JSON (dict, list, str, number, bool, None)", verb="")


def _normalize_json_object(value: Any, t: type, depth: int) -> dict[str, Any]:
    items = []
    for k, v in dict.items(value) if issubclass(t, dict) else value.items():
        if not isinstance(k, str):
            raise _Unencodable(f"has a non-string key {_safe_repr(k)}: JSON object keys are strings", verb="")
        name = str.__str__(k)
        try:
            items.append((name, _normalize_json(v, depth + 1)))
        except _Unencodable as exc:
            exc.steps.append(f"[{name!r}]")
            raise
    return dict(items)  # encoded with its keys sorted, and tagged apart from arrays


def _normalize_json_array(value: Any, t: type, depth: int) -> list[Any]:
    out = []
    try:
        raw = list.__getitem__(value, _WHOLE) if issubclass(t, list) else tuple.__getitem__(value, _WHOLE)
        for i, v in enumerate(raw):  # noqa: B007 - ``i`` is read by the except clause
            out.append(_normalize_json(v, depth + 1))
    except _Unencodable as exc:
        exc.steps.append(f"[{i}]")
        raise
    return out


def json_key(value: Any) -> str:
    """A stable key for a JSON-like request body: equal bodies (key order, ``1`` vs ``1.0``
    aside) give equal keys, different ones never do. ``"json:" + xxh3-128``.

    Example:
        >>> json_key({"q": "cats", "k": 10}) == json_key({"k": 10.0, "q": "cats"})
        True
    """
    return "json:" + digest(canonical_bytes(normalize_json(value)))


def llm_key(model: str, messages: Any, **params: Any) -> str:
    """A stable key for an LLM call: the model, the messages (role, content, tool calls, as
    given) and the sampling parameters; ``None`` parameters and those in ``LLM_IGNORED``
    (``stream``, ``user``, ``timeout``, ...) are left out. ``"llm:" + xxh3-128``.

    Example:
        >>> a = llm_key("gpt-x", [{"role": "user", "content": "hi"}], temperature=0, stream=True)
        >>> a == llm_key("gpt-x", [{"content": "hi", "role": "user"}], temperature=0.0)
        True
    """
    if not isinstance(model, str) or not model:
        raise KeyEncodingError(f"model={model!r} must be a non-empty str")
    kept = {k: v for k, v in params.items() if v is not None and k not in LLM_IGNORED}
    body = {"model": model, "messages": messages, "params": kept}
    return "llm:" + digest(canonical_bytes(normalize_json(body)))
