"""Stable cache keys: a canonical, type-tagged encoding of call arguments and its xxh3-128 digest.

The same call must give the same Redis key in every process and every Python run, so nothing
here uses ``hash()`` (salted per process) or ``repr()`` of arbitrary objects. Every value is
written with a type tag and a length or terminator, so ``1``, ``"1"``, ``1.0``, ``True``,
``(1,)`` and ``[1]`` all encode differently, and no two distinct argument lists share bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import inspect
import math
import re
import struct
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import xxhash

from .errors import ConfigError, KeyEncodingError

__all__ = [
    "FORMAT_VERSION",
    "KeyMaker",
    "KeySpace",
    "canonical_bytes",
    "digest",
    "function_prefix",
    "json_key",
    "llm_key",
    "normalize_json",
    "scoped_key",
    "version_key",
    "user_key",
    "validate_namespace",
]

#: Bumped whenever the encoding below changes, so old entries are never misread as new keys.
FORMAT_VERSION = "v1"

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}(:[A-Za-z0-9_.\-]{1,64})*")

# Top-level argument types whose equality implies equal canonical bytes *given the type*.
# Only calls whose arguments are all of these exact types are memoised (see KeyMaker).
_MEMO_SAFE: frozenset[type] = frozenset({str, int, float, bytes, bool, type(None)})
_MEMO_LIMIT = 4096


def validate_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigError(
            f"namespace={namespace!r} is invalid: use 1-64 characters from "
            "[A-Za-z0-9_.-] (segments may be joined by ':'), e.g. namespace='myapp'"
        )
    return namespace


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _encode(obj: Any, out: bytearray, path: str) -> None:
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
        out += b"(%d:" % len(obj) if t is tuple else b"[%d:" % len(obj)
        for i, item in enumerate(obj):
            _encode(item, out, f"{path}[{i}]")
    elif t is dict:
        _encode_mapping(obj, out, path, b"{")
    elif t is set or t is frozenset:
        parts = []
        for item in obj:
            buf = bytearray()
            _encode(item, buf, f"{path}{{…}}")
            parts.append(bytes(buf))
        parts.sort()
        out += b"<%d:" % len(parts) if t is set else b">%d:" % len(parts)
        for p in parts:
            out += p
    else:
        _encode_other(obj, out, path)


def _encode_mapping(obj: Mapping[Any, Any], out: bytearray, path: str, tag: bytes) -> None:
    items = []
    for k, v in obj.items():
        kb = bytearray()
        _encode(k, kb, f"{path}[{k!r}] (key)")
        vb = bytearray()
        _encode(v, vb, f"{path}[{k!r}]")
        items.append((bytes(kb), bytes(vb)))
    items.sort()
    out += tag + b"%d:" % len(items)
    for key_bytes, value_bytes in items:
        out += key_bytes
        out += value_bytes


def _tagged_name(out: bytearray, tag: bytes, obj: Any) -> None:
    name = _qualified_name(obj).encode()
    out += tag + b"%d:" % len(name) + name


def _encode_other(obj: Any, out: bytearray, path: str) -> None:
    hook = getattr(type(obj), "__tiercache_key__", None)
    if hook is not None:
        _tagged_name(out, b"H", type(obj))
        _encode(hook(obj), out, f"{path}.__tiercache_key__()")
    elif isinstance(obj, enum.Enum):
        _tagged_name(out, b"E", type(obj))
        _encode(obj.value, out, f"{path}.value")
    elif isinstance(obj, dt.datetime):
        out += b"D" + obj.isoformat().encode() + b";"
    elif isinstance(obj, dt.date):
        out += b"d" + obj.isoformat().encode() + b";"
    elif isinstance(obj, dt.time):
        out += b"t" + obj.isoformat().encode() + b";"
    elif isinstance(obj, dt.timedelta):
        out += b"R%d,%d,%d;" % (obj.days, obj.seconds, obj.microseconds)
    elif isinstance(obj, decimal.Decimal):
        out += b"M" + str(obj).encode() + b";"
    elif isinstance(obj, uuid.UUID):
        out += b"U" + obj.bytes
    elif isinstance(obj, (bytearray, memoryview)):
        data = bytes(obj)
        out += b"y%d:" % len(data) + data
    elif isinstance(obj, type):
        _tagged_name(out, b"C", obj)
    elif dataclasses.is_dataclass(obj):
        _tagged_name(out, b"A", type(obj))
        fields = dataclasses.fields(obj)
        out += b"%d:" % len(fields)
        for f in fields:
            _encode(f.name, out, path)
            _encode(getattr(obj, f.name), out, f"{path}.{f.name}")
    elif hasattr(obj, "model_dump") and hasattr(type(obj), "model_fields"):  # pydantic v2
        _tagged_name(out, b"P", type(obj))
        _encode(obj.model_dump(mode="python"), out, path)
    elif isinstance(obj, (str, int, float, bytes, tuple, list, dict, frozenset, set)):
        # A subclass of a builtin (e.g. a str subclass): the class name, then the base value.
        _tagged_name(out, b"S", type(obj))
        base: Any = next(b for b in (int, float, str, bytes, tuple, list, dict, frozenset, set) if isinstance(obj, b))
        _encode(base(obj), out, path)
    else:
        raise KeyEncodingError(
            f"cannot encode {path} (a {type(obj).__qualname__}) into a cache key: pass "
            "str/int/float/bool/None/bytes, tuples, lists, dicts, sets, datetimes, enums, "
            "dataclasses or pydantic models, define __tiercache_key__(self) on the class, "
            "or give tiered(..., key=...)"
        )


def canonical_bytes(value: Any, path: str = "value") -> bytes:
    """The canonical, type-tagged encoding of ``value`` (the input of :func:`digest`)."""
    out = bytearray()
    _encode(value, out, path)
    return bytes(out)


def digest(data: bytes) -> str:
    """xxh3-128 of ``data`` as 32 hex digits: stable across processes, platforms and runs."""
    return xxhash.xxh3_128_hexdigest(data)


def function_prefix(namespace: str, name: str) -> str:
    """``tc:{namespace}:v1:f:{module.qualname}:`` — the part of a function's keys before the digest."""
    if "{" in name or "}" in name:
        raise ConfigError(f"name={name!r} must not contain braces (they are Redis Cluster hash tags)")
    return f"tc:{namespace}:{FORMAT_VERSION}:f:{name}:"


def user_key(namespace: str, key: str) -> str:
    """The Redis key of a user-chosen key (``cache.get("user:1")``).

    The user part goes inside a ``{hash tag}``, so keys derived from it (a future cluster mode
    needs them in one slot) stay together; a key that contains braces itself is digested, so
    the tag stays well formed.
    """
    if not isinstance(key, str) or not key:
        raise KeyEncodingError(f"key={key!r} must be a non-empty str")
    if "{" in key or "}" in key:
        key = "#" + digest(key.encode("utf-8", "surrogatepass"))
    return f"tc:{namespace}:{FORMAT_VERSION}:k:{{{key}}}"


def version_key(namespace: str, kind: str, name: str) -> str:
    """Where a tag's or tenant's version counter lives: ``tc:{ns}:tag:{name}`` (or ``tenant``)."""
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # an integer id names the same tenant as its decimal string
    if not isinstance(name, str) or not name:
        raise KeyEncodingError(f"{kind} {name!r} must be a non-empty str (or an int id)")
    if "{" in name or "}" in name:
        name = "#" + digest(name.encode("utf-8", "surrogatepass"))
    return f"tc:{namespace}:{kind}:{{{name}}}"


def scoped_key(key: str, tenant: str | None, versions: list[int]) -> str:
    """``key`` in a scope: its tenant and the versions of its tags and tenant, digested and put
    before the hash tag (so the key's lease and refresh keys stay in its slot). Bumping any
    version makes a new key: the old entries are never read again and expire by TTL."""
    memo_key = (tenant, *versions)
    segment = _SCOPES.get(memo_key)
    if segment is None:
        segment = "s" + xxhash.xxh3_128_hexdigest(canonical_bytes((tenant, versions), "scope")) + ":"
        if len(_SCOPES) >= _MEMO_LIMIT:
            _SCOPES.clear()
        _SCOPES[memo_key] = segment
    i = key.rindex("{")
    return key[:i] + segment + key[i:]


# (tenant, *versions) -> the key segment of that scope: the same few scopes serve every hit.
_SCOPES: dict[tuple[Any, ...], str] = {}


#: Request fields that do not change an LLM's answer, left out of ``llm_key``.
LLM_IGNORED = frozenset({"stream", "stream_options", "user", "timeout", "request_timeout", "extra_headers", "metadata"})


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function, or of a partial's or a callable object's target."""
    target = getattr(fn, "func", fn)  # functools.partial
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{qualname}"


def normalize_json(value: Any, path: str = "request") -> Any:
    """A JSON-like value in canonical form, for keys: mappings as dicts of string keys (their
    canonical encoding sorts them), lists and tuples as lists, floats that are whole numbers
    as ints (``1.0`` and ``1`` are the same JSON number), ``-0.0`` as ``0``. Raises
    KeyEncodingError for NaN, infinities, non-string mapping keys and anything JSON cannot
    hold, naming where it is."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise KeyEncodingError(f"{path} is {value!r}: not a JSON number")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise KeyEncodingError(f"{path} has a non-string key {k!r}: JSON object keys are strings")
            items.append((k, normalize_json(v, f"{path}[{k!r}]")))
        return dict(items)  # encoded with its keys sorted, and tagged apart from arrays
    if isinstance(value, (list, tuple)):
        return [normalize_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise KeyEncodingError(f"{path} is a {type(value).__qualname__}: not JSON (dict, list, str, number, bool, None)")


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


class KeyMaker:
    """Derives the Redis key of a call to one function.

    ``__call__`` is on the L1 hit path, so it first looks in a small memo keyed by the raw
    arguments *and their exact types*; the memo only ever holds calls whose arguments are all
    of types where equal values of the same type have equal encodings (str, int, float,
    bytes, bool, None), so ``f(1)`` and ``f(True)`` can never be confused there. Everything
    else takes the full path: bind to the signature (defaults applied, so ``f(1)`` and
    ``f(x=1)`` share a key), encode canonically, digest.
    """

    __slots__ = (
        "__weakref__",
        "_memo",
        "_params",
        "_prefix",
        "_qualname",
        "_signature",
        "_skip_first",
        "_space",
        "single",
    )

    def __init__(
        self, fn: Callable[..., Any], prefix: str, *, skip_first: bool = False, space: KeySpace | None = None
    ) -> None:
        self._signature = inspect.signature(fn)
        self._params = list(self._signature.parameters.values())
        #: With ``space``, the part of the prefix after the space's root (which changes when
        #: the namespace is cleared); else the whole prefix.
        self._prefix = prefix
        self._space = space
        if space is not None:
            space.register(self)
        self._qualname = getattr(fn, "__qualname__", repr(fn))
        self._skip_first = skip_first
        self._memo: dict[Any, str] = {}
        #: One-argument calls by the argument's exact type (memo-safe types only): lets the
        #: hit path find the key without building a tuple. Never filled for methods.
        self.single: dict[type, dict[Any, str]] = {} if skip_first else {t: {} for t in _MEMO_SAFE}

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self._skip_first:
            owner = args[0] if args else None
            if getattr(type(owner), "__tiercache_key__", None) is not None:
                return self._derive(args, kwargs)  # instance state is part of the key
            args = args[1:]
        if kwargs:
            lk: Any = (_KW, args, tuple(map(type, args)), tuple(kwargs.items()), tuple(map(type, kwargs.values())))
        else:
            lk = args + tuple(map(type, args))
        # The memos are taken before the key is derived: when the namespace is cleared, the
        # new root is set before the memos are replaced, so a key derived with the old root
        # can only land in a memo that is already discarded.
        memo = self._memo
        single = self.single.get(type(args[0])) if len(args) == 1 and not kwargs and not self._skip_first else None
        try:
            return memo[lk]
        except KeyError:
            pass
        except TypeError:  # unhashable argument: no memo, full path every time
            return self._derive_unbound(args, kwargs)
        key = self._derive_unbound(args, kwargs)
        if single is not None:
            if len(single) >= _MEMO_LIMIT:
                single.clear()
            single[args[0]] = key
        if _MEMO_SAFE.issuperset(map(type, args)) and _MEMO_SAFE.issuperset(map(type, kwargs.values())):
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[lk] = key
        return key

    def reset(self) -> None:
        """Forget every memoized key (the namespace's root changed)."""
        self._memo = {}
        for t in self.single:
            self.single[t] = {}

    def prefix(self) -> str:
        return self._prefix if self._space is None else self._space.root + self._prefix

    def _derive_unbound(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self._skip_first:
            args = (None, *args)  # a placeholder for self, left out of the key
        return self._derive(args, kwargs)

    def _derive(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._qualname}() {exc}") from None
        bound.apply_defaults()
        out = bytearray()
        for i, param in enumerate(self._params):
            value = bound.arguments[param.name]
            if i == 0 and self._skip_first:
                hook = getattr(type(value), "__tiercache_key__", None)
                if hook is None:
                    continue
                value = hook(value)
            _encode(param.name, out, param.name)
            try:
                _encode(value, out, f"argument {param.name!r}")
            except KeyEncodingError as exc:
                raise KeyEncodingError(f"{self._qualname}(): {exc}") from None
        return self.prefix() + "{" + digest(bytes(out)) + "}"


class KeySpace:
    """A namespace's keys at its current generation.

    ``cache.clear()`` increments the generation (in Redis, ``tc:{ns}:gen``) and every
    process adopts it: keys are then ``tc:{ns}:v1:g<n>:...``, so every entry written
    before is never read again (it expires by its TTL): a whole-namespace flush in O(1),
    with no KEYS or SCAN. Generation "" (never cleared) keeps the plain ``tc:{ns}:v1:``.
    """

    __slots__ = ("_makers", "generation", "namespace", "root")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.generation = ""
        self.root = f"tc:{namespace}:{FORMAT_VERSION}:"
        self._makers: weakref.WeakSet[KeyMaker] = weakref.WeakSet()

    def register(self, maker: KeyMaker) -> None:
        self._makers.add(maker)

    def advance(self, generation: str, forward_only: bool = True) -> bool:
        """Adopt ``generation`` (a decimal number, "" for none yet); True if it changed. Only
        a later one, unless not ``forward_only`` (what Redis holds when we subscribe is the
        truth, even if it went backwards, e.g. after a FLUSHALL). The root changes first,
        then every registered KeyMaker forgets its memos (see ``KeyMaker.__call__``)."""
        if generation == self.generation:
            return False
        if forward_only and _generation_number(generation) <= _generation_number(self.generation):
            return False
        self.generation = generation
        self.root = f"tc:{self.namespace}:{FORMAT_VERSION}:" + (f"g{generation}:" if generation else "")
        for maker in list(self._makers):
            maker.reset()
        return True

    def user_key(self, key: str) -> str:
        """``user_key`` at the current generation."""
        return self.root + user_key(self.namespace, key)[len(f"tc:{self.namespace}:{FORMAT_VERSION}:") :]


def _generation_number(generation: str) -> int:
    try:
        return int(generation or 0)
    except ValueError:  # not ours: order it first, so any numbered generation replaces it
        return -1


class _KwMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<kwargs>"


_KW = _KwMarker()
