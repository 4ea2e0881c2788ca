"""Stable cache keys: every Redis key and channel name, the key of a call (``KeyMaker``, on
the canonical encoding of ``_encoding``), scopes, generations, and the one-live-function-per-
name check. The encoding itself lives in ``_encoding`` and is re-exported here."""

from __future__ import annotations

import gc
import inspect
import re
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from ._encoding import (
    _encode,
    _key_error,
    _safe_repr,
    _Unencodable,
    canonical_bytes,
    digest,
    json_key,
    llm_key,
    normalize_json,
)
from .errors import ConfigError, KeyEncodingError

__all__ = [
    "FORMAT_VERSION",
    "KeyMaker",
    "KeySpace",
    "canonical_bytes",
    "claim_prefix",
    "digest",
    "function_part",
    "function_prefix",
    "json_key",
    "llm_key",
    "normalize_json",
    "refresh_key",
    "scope_name",
    "scoped_key",
    "version_key",
    "user_key",
    "validate_namespace",
    "waiters_key",
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


#: Only calls whose memo-safe arguments are this small in all (characters of str, bytes of
#: bytes and int) are memoised, so a function's memos stay at a few MB whatever its callers
#: pass: a memo holds its arguments alive.
_MEMO_MAX_SIZE = 256


# -- Redis names ----------------------------------------------------------------------------
# Every Redis key and channel name tiercache uses is built in this section (KeySpace gathers a
# namespace's; the flows ask it). Existing data and other processes depend on these formats:
# tests/unit/test_names.py pins each one, so a change is deliberate.


def _base(namespace: str) -> str:
    """``tc:{ns}:v1:``: the root of a namespace's value keys at generation "" (never cleared)."""
    return f"tc:{namespace}:{FORMAT_VERSION}:"


def _generation_root(namespace: str, generation: str) -> str:
    """``tc:{ns}:v1:g<n>:`` (generation "": ``tc:{ns}:v1:``), the root of a generation's value keys."""
    return _base(namespace) + (f"g{generation}:" if generation else "")


def _hash_tagged(prefix: str, tag: str) -> str:
    """``prefix{tag}``: the braces are a Redis Cluster hash tag, so the key's derived keys
    (``waiters_key``, ``refresh_key``, scoped variants) share its slot."""
    return prefix + "{" + tag + "}"


def waiters_key(key: str) -> str:
    """``<key>:w``: the flag raised by processes waiting for another's fill of ``key`` (same slot)."""
    return key + ":w"


def refresh_key(key: str) -> str:
    """``<key>:r``: where a refresh in progress keeps its token, after the key's hash tag (same slot)."""
    return key + ":r"


def function_prefix(namespace: str, name: str) -> str:
    """``tc:{namespace}:v1:f:{module.qualname}:`` — the part of a function's keys before the digest
    (at generation ""; ``function_part`` is the part after a generation's root).

    Raises:
        ConfigError: ``name`` is not a non-empty str, holds braces or a lone surrogate.
    """
    return _base(namespace) + function_part(name)


def function_part(name: str) -> str:
    """``f:{name}:``, the part of a function's keys between the root and the digest."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name={name!r} must be a non-empty str, e.g. name='billing.convert'")
    name = str.__str__(name)  # an exact str: a subclass's __contains__/__format__ play no part
    if "{" in name or "}" in name:
        raise ConfigError(f"name={name!r} must not contain braces (they are Redis Cluster hash tags)")
    if not _is_utf8(name):
        raise ConfigError(f"name={name!r} contains a lone surrogate, which Redis cannot hold: pass valid text")
    return f"f:{name}:"


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (no lone surrogates, e.g. from ``os.fsdecode``): redis-py
    encodes strictly, so a key that does not would fail inside it as if Redis had failed."""
    if text.isascii():  # O(1) in CPython: the common case costs no copy
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key_text(value: Any, what: str) -> str:
    """``value`` (a str) as an exact, non-empty str that Redis can hold, or KeyEncodingError
    (the caller's error: it must never reach redis-py and count as a Redis failure)."""
    if type(value) is not str:
        if not isinstance(value, str):
            raise KeyEncodingError(f"{what}={_safe_repr(value)} must be a non-empty str")
        value = str.__str__(value)  # the raw text, not the subclass's __str__/__format__
    text: str = value
    if not text:
        raise KeyEncodingError(f"{what}={text!r} must be a non-empty str")
    if not _is_utf8(text):
        raise KeyEncodingError(
            f"{what}={text!r} contains a lone surrogate (os.fsdecode makes them from undecodable "
            "bytes), which Redis cannot hold: pass valid text, e.g. "
            "os.fsencode(name).decode('utf-8', 'backslashreplace')"
        )
    return text


def user_key(namespace: str, key: str) -> str:
    """The Redis key of a user-chosen key (``cache.get("user:1")``).

    The user part goes inside a ``{hash tag}``, so keys derived from it (a future cluster mode
    needs them in one slot) stay together; a key that contains braces itself is digested, so
    the tag stays well formed.
    """
    return _base(namespace) + _user_part(_key_text(key, "key"))


def _user_part(key: str) -> str:
    """``k:{key}``, the part of a user key after the root; ``key`` is already checked text."""
    if "{" in key or "}" in key:
        key = "#" + digest(key.encode("utf-8", "surrogatepass"))
    return _hash_tagged("k:", key)


def version_key(namespace: str, kind: str, name: str) -> str:
    """Where a tag's or tenant's version counter lives: ``tc:{ns}:tag:{name}`` (or ``tenant``)."""
    name = scope_name(name, kind)
    if "{" in name or "}" in name:
        name = "#" + digest(name.encode("utf-8", "surrogatepass"))
    return _hash_tagged(f"tc:{namespace}:{kind}:", name)


def scope_name(name: Any, kind: str) -> str:
    """A tag's or tenant's name as an exact str (an int id names the same tenant as its
    decimal string), or KeyEncodingError."""
    if type(name) is str and name and name.isascii():
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        return str(int.__index__(name))  # the raw number, not a subclass's __str__
    if not isinstance(name, str) or not name:
        raise KeyEncodingError(f"{kind} {_safe_repr(name)} must be a non-empty str (or an int id)")
    return _key_text(name, kind)


def scoped_key(key: str, tenant: str | None, versions: list[int]) -> str:
    """``key`` in a scope: its tenant and the versions of its tags and tenant, digested and put
    before the hash tag (so the key's lease and refresh keys stay in its slot). Bumping any
    version makes a new key: the old entries are never read again and expire by TTL."""
    if tenant is not None and type(tenant) is not str:
        tenant = scope_name(tenant, "tenant")  # the memo compares exact strs only
    memo_key = (tenant, *versions)
    segment = _SCOPES.get(memo_key)
    if segment is None:
        segment = "s" + xxhash.xxh3_128_hexdigest(canonical_bytes((tenant, versions), "scope")) + ":"
        if tenant is None or len(tenant) <= _MEMO_MAX_SIZE:  # a memo keeps its tenant alive
            if len(_SCOPES) >= _MEMO_LIMIT:
                _SCOPES.clear()
            _SCOPES[memo_key] = segment
    i = key.rindex("{")
    return key[:i] + segment + key[i:]


# (tenant, *versions) -> the key segment of that scope: the same few scopes serve every hit.
_SCOPES: dict[tuple[Any, ...], str] = {}


def claim_prefix(owner: object, name: str, fn: Callable[..., Any]) -> None:
    """Refuse a function whose derived key name (``module.qualname``, no ``name=``) is already
    used on ``owner`` (a cache) by another live function: the two would share entries, and
    one would answer with the other's results (closures made by one factory, callable
    objects or partials of one class or function). A lambda is refused outright: every
    lambda of a scope is ``<lambda>``. Only weak references are kept, so a function that was
    garbage-collected frees its name; re-decorating the same function is fine, and so is
    redefining a module-level function (a reloaded module, a re-run notebook cell), whose
    new definition takes the name over.

    Raises:
        ConfigError: naming the function and saying to pass ``name=``.
    """
    if "<lambda>" in name:
        raise ConfigError(
            f"cannot derive a key name for the lambda {name!r}: every lambda of a scope has that name, so "
            "they would share entries; pass name='...' to the decorator (a name of its own for each function)"
        )
    try:
        ref: Callable[[], Any] = weakref.WeakMethod(fn) if inspect.ismethod(fn) else weakref.ref(fn)
    except TypeError:  # not weakly referenceable: cannot tell when it dies, so not tracked
        return
    for attempt in range(2):
        with _CLAIMS_LOCK:
            claims = _CLAIMS.get(owner)
            if claims is None:
                claims = _CLAIMS[owner] = {}
            old = claims.get(name)
            holder = old() if old is not None else None
            if holder is None or _same_callable(holder, fn) or _redefines(holder, fn, name):
                claims[name] = ref
                return
            holder = None  # no strong reference while collecting
        if attempt == 0:
            # The other may be garbage that only a collection frees (a decorated function
            # sits in a reference cycle), e.g. a locally defined function of a finished call.
            gc.collect()
    raise ConfigError(
        f"another live function on this cache already has the key name {name!r}, so the two would share "
        "entries (one would return the other's results); pass name='...' to the decorator, a name of its "
        "own for each (e.g. name=f'convert.{currency}' for closures of one factory)"
    )


def _same_callable(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return inspect.ismethod(a) and inspect.ismethod(b) and a.__func__ is b.__func__ and a.__self__ is b.__self__


def _redefines(old: Any, new: Any, name: str) -> bool:
    """A module-level function defined again (its module reloaded, a notebook cell re-run)."""
    return inspect.isfunction(old) and inspect.isfunction(new) and "<locals>" not in name


# cache core -> derived key name -> weak reference to the function that has it.
_CLAIMS: weakref.WeakKeyDictionary[object, dict[str, Callable[[], Any]]] = weakref.WeakKeyDictionary()
_CLAIMS_LOCK = threading.Lock()


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function, or of a partial's or a callable object's target."""
    target = getattr(fn, "func", fn)  # functools.partial
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{qualname}"


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
        except Exception:  # noqa: BLE001 - unhashable (or a broken __hash__/__eq__): no memo
            return self._derive_unbound(args, kwargs)
        key = self._derive_unbound(args, kwargs)
        # A memo keeps its arguments alive: only small ones enter it (see _MEMO_MAX_SIZE).
        if single is not None and _memo_size(args) <= _MEMO_MAX_SIZE:
            if len(single) >= _MEMO_LIMIT:
                single.clear()
            single[args[0]] = key
        if (
            _MEMO_SAFE.issuperset(map(type, args))
            and _MEMO_SAFE.issuperset(map(type, kwargs.values()))
            and _memo_size(args) + _memo_size(kwargs.values()) <= _MEMO_MAX_SIZE
        ):
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
        arguments = bound.arguments
        try:
            for i, param in enumerate(self._params):
                value = arguments[param.name]
                if i == 0 and self._skip_first:
                    hook = getattr(type(value), "__tiercache_key__", None)
                    if hook is None:
                        continue
                    value = hook(value)
                _encode(param.name, out, 0)
                _encode(value, out, 0)
        except (_Unencodable, RecursionError) as exc:
            # The path is built only now, on the error (not for every argument of every call).
            raise _key_error(exc, f"{self._qualname}(): argument {param.name!r}") from None
        return _hash_tagged(self.prefix(), digest(bytes(out)))


def _memo_size(values: Iterable[Any]) -> int:
    """Roughly how much memory memoising these (memo-safe) values keeps alive: characters of
    str, bytes of bytes and int; a few for the rest."""
    size = 0
    for v in values:
        t = type(v)
        if t is str or t is bytes:
            size += len(v)
        elif t is int:
            size += v.bit_length() >> 3
    return size


class KeySpace:
    """Every Redis key and channel name of one namespace, at its current generation.

    The one place they are built (with the functions of the "Redis names" section above);
    other modules ask it. The formats (``ns`` the namespace, ``db`` the database number)::

        invalidation channel     tc:{ns}:inval:{db}     (pub/sub ignores the database: named here)
        sequence counter         tc:{ns}:seq
        generation counter       tc:{ns}:gen
        acknowledgement list     tc:{ns}:ack:<16 hex digits, fresh per write>
        root of value keys       tc:{ns}:v1:            (after a clear: tc:{ns}:v1:g<n>:)
        user key                 <root>k:{key}          (braces in key: k:{#<digest>})
        function key             <root>f:{name}:{<digest of the arguments>}
        scoped key               <key before its hash tag>s<digest of tenant, versions>:{...}
        tag / tenant version     tc:{ns}:tag:{name}, tc:{ns}:tenant:{name}
        lease waiters flag       <value key>:w
        refresh token            <value key>:r

    ``cache.clear()`` increments the generation (in Redis, ``gen_key``) and every process
    adopts it: keys are then ``tc:{ns}:v1:g<n>:...``, so every entry written before is never
    read again (it expires by its TTL): a whole-namespace flush in O(1), with no KEYS or SCAN.
    Generation "" (never cleared) keeps the plain ``tc:{ns}:v1:``.
    """

    __slots__ = ("_makers", "_own", "base", "channel", "gen_key", "generation", "namespace", "root", "seq_key")

    #: The derived keys of a value key (the same for every namespace).
    waiters_key = staticmethod(waiters_key)
    refresh_key = staticmethod(refresh_key)

    def __init__(self, namespace: str, db: int = 0) -> None:
        self.namespace = namespace
        # Pub/sub ignores the database number, so the channel names it: caches of one namespace
        # in different databases must not hear (or count, or acknowledge) each other.
        self.channel = f"tc:{namespace}:inval:{db}"
        self.seq_key = f"tc:{namespace}:seq"
        self.gen_key = f"tc:{namespace}:gen"
        #: The root of value keys at generation "" (``tc:{ns}:v1:``): every generation's starts so.
        self.base = _base(namespace)
        self.generation = ""
        self.root = self.base
        self._own = re.compile(re.escape(self.base) + r"(g[0-9a-f]+:)?[fk]:")
        self._makers: weakref.WeakSet[KeyMaker] = weakref.WeakSet()

    def register(self, maker: KeyMaker) -> None:
        self._makers.add(maker)

    def advance(self, generation: str) -> bool:
        """Adopt ``generation`` (a decimal number, "" for none yet) if it is later than ours;
        True if it changed. Generations never go back (a counter in Redis that did is brought
        forward instead: ``_remote.sync_generation``). The root changes first, then every
        registered KeyMaker forgets its memos (see ``KeyMaker.__call__``)."""
        if _generation_number(generation) <= _generation_number(self.generation):
            return False
        self.generation = generation
        self.root = _generation_root(self.namespace, generation)
        for maker in list(self._makers):
            maker.reset()
        return True

    def owns(self, key: str) -> bool:
        """Whether ``key`` is a value key (a function's or a user key) of this namespace, at any generation."""
        return self._own.match(key) is not None

    def generation_of(self, key: str) -> str | None:
        """The generation a value key of this namespace names ("" for none: never cleared), or
        None for a key that is not generation-scoped (a tag's or tenant's version counter)."""
        if not key.startswith(self.base):
            return None
        rest = key[len(self.base) :]
        return rest[1 : rest.index(":")] if rest.startswith("g") and ":" in rest else ""

    def generation_number(self) -> int:
        """The current generation as a number (0 before any clear; -1 for one not ours)."""
        return _generation_number(self.generation)

    def ack_key(self) -> str:
        """A fresh acknowledgement list, for one write that waits for the other processes."""
        return f"tc:{self.namespace}:ack:{secrets.token_hex(8)}"

    def user_key(self, key: str) -> str:
        """``user_key`` at the current generation."""
        return self.root + _user_part(_key_text(key, "key"))

    def function_key(self, part: str, digest: str) -> str:
        """A function's key at the current generation: ``part`` is its ``function_part``,
        ``digest`` that of its arguments."""
        return _hash_tagged(self.root + part, digest)

    def version_key(self, kind: str, name: str) -> str:
        """Where a tag's (``kind="tag"``) or tenant's version counter lives (no generation)."""
        return version_key(self.namespace, kind, name)


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
