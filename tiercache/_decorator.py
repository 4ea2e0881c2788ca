"""``@tiered``: read-through caching of sync and async functions and methods.

How ``self`` enters the key: a function whose first parameter is named ``self`` is a method,
and ``self`` is left out of the key (every instance shares the entries) unless the
instance's class defines ``__tiercache_key__(self)``, whose result is then part of the key.
``cls`` of a classmethod is part of the key (as the class's qualified name), as is every
other argument. Put ``@tiered`` above ``@classmethod`` and ``@staticmethod`` (outermost), so
its helpers bind the same way the call does.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from . import _read, _scope, _validate, _write
from ._cache import TieredCache, engine_of
from ._coherence import WriteResult
from ._hit import KeyFn, NeedLoad, Scope, hit_path
from ._keys import (
    KeyMaker,
    KeySpace,
    callable_name,
    canonical_bytes,
    claim_prefix,
    digest,
    function_prefix,
    scoped_key,
)
from ._policy import Policy
from ._protocols import AsyncTieredFunction, TieredFunction
from ._steps import Flow
from ._types import CALL
from .errors import BackendError

__all__ = ["AsyncTieredFunction", "TieredFunction", "tiered"]

P = ParamSpec("P")
R = TypeVar("R")
_P2 = ParamSpec("_P2")
_S = TypeVar("_S")


class _Tiered:
    """What sync and async decorated functions share: configuration, keys, method binding.

    A plain function decorated with ``@tiered`` becomes the closure ``_call`` (with the
    helpers attached): calling a closure costs less than calling an object. Methods and
    ``@tiered``-over-``@classmethod`` keep this object, a descriptor that binds the helpers too.
    """

    _call: Callable[..., Any]

    def __init__(
        self,
        fn: Callable[..., Any],
        cache: TieredCache,
        key: Callable[..., Any] | None,
        name: str | None,
        options: dict[str, Any],
    ) -> None:
        self._fn = fn
        self._custom_key = key
        self._cache = cache
        self._engine = engine = engine_of(cache)
        self._core = engine.core
        qualname = callable_name(fn)
        ttl = options.pop("ttl") or self._core.ttl
        l1_ttl = options.pop("l1_ttl")
        refresh_after = options.get("refresh_after")
        _validate.less_than("refresh_after", refresh_after, "ttl", ttl, " (it refreshes before expiry)")
        tags, tenant = options.pop("tags"), options.pop("tenant")
        scoped = tags is not None or tenant is not None or engine.tenant_var is not None
        self._scope = Scope(engine, tags, tenant) if scoped else None
        self._policy = Policy(qualname, ttl, self._core.l1_ttl if l1_ttl is None else l1_ttl, **options)
        function_prefix(cache.namespace, name or qualname)  # validates the name
        self._prefix = f"f:{name or qualname}:"  # after the namespace's (generation's) root
        self._keyfn: KeyFn
        self._binding = ""
        # A first parameter named ``self`` makes a method, wherever the function is defined
        # (``m = tiered(cache)(f)`` in a class body binds like a method defined there).
        self._bind("method" if _first_param(fn) == "self" else "function")
        self._hints_pending = True
        self._register_return_types()
        functools.update_wrapper(self, fn)
        self.cache = cache
        if name is None:
            claim_prefix(self._core, qualname, fn)  # one live function per derived name

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The Redis key this call uses (in its scope: tags' and tenant's current versions,
        which may take a blocking round trip to Redis to read; an async function's
        ``await f.akey(...)`` reads them on the event loop)."""
        if self._scope is None:
            return self._keyfn(args, kwargs)
        return self._or_known(self._engine.run(self._scoped(args, kwargs)), args, kwargs)

    def _or_known(self, key: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """``key``, or, when Redis cannot say (down, breaker open), the key at the versions this
        process knows last (in strict mode, an error), so ``cache.invalidate(f.key(...))`` still
        drops this process's copy and reports, rather than raises, that Redis failed."""
        if key is not None:
            return key
        if self._core.strict:
            raise BackendError("the tag or tenant versions of this call cannot be read from Redis")
        assert self._scope is not None  # only scoped functions read versions
        tenant, names = self._scope.resolve(args, kwargs)
        return scoped_key(self._keyfn(args, kwargs), tenant, _scope.known_versions(self._core, names))

    def _scoped(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flow[str | None]:
        """The call's key in its scope now (None: its versions cannot be read)."""
        base = self._keyfn(args, kwargs)
        if self._scope is None:
            return base
        tenant, names = self._scope.resolve(args, kwargs)
        return (yield from _scope.scope_key(self._core, base, tenant, names))

    def _invalidate_flow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flow[WriteResult]:
        key = yield from self._scoped(args, kwargs)
        if key is None:
            return WriteResult(None, None, None)
        return (yield from _write.delete(self._core, [key], None))

    def _refresh_flow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flow[Any]:
        key = yield from self._scoped(args, kwargs)
        if key is None:
            return (yield CALL)
        return (yield from _write.refresh(self._core, key, self._policy))

    def _miss_flow(self, need: NeedLoad) -> Flow[Any]:
        if self._hints_pending:
            self._register_return_types()
        if need.scope is None:
            return _read.read_through(self._core, need.key, self._policy, True)
        return _scope.scoped_read(self._core, need.key, *need.scope, self._policy)

    def _register_return_types(self) -> None:
        # Lets the default serializer decode the dataclasses/pydantic models/enums this
        # function returns; retried on a miss when the annotation names a class defined later.
        register = getattr(self._cache.serializer, "register_annotation", None)
        if register is None:
            self._hints_pending = False
            return
        try:
            hints = typing.get_type_hints(self._fn)
        except Exception:  # noqa: BLE001 - a forward reference not defined yet
            return
        self._hints_pending = False
        if "return" in hints:
            register(hints["return"])

    def _bind(self, binding: str) -> None:
        """How the function attaches to a class: "function" (plain or static), "method"
        (``self`` first, left out of the key) or "class" (``cls`` first, part of the key)."""
        if binding == self._binding:
            return
        self._binding = binding
        if self._custom_key is None:
            self._keyfn = KeyMaker(self._fn, self._prefix, skip_first=binding == "method", space=self._core.keyspace)
        else:
            self._keyfn = _custom_key(self._custom_key, self._core.keyspace, self._prefix)
        self._call = self._make_call()

    def _make_call(self) -> Callable[..., Any]:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def _as_function(self) -> Callable[..., Any]:
        """The closure, dressed as the decorated function, with the helpers attached."""
        call = self._call
        functools.update_wrapper(call, self._fn)
        call.invalidate = self.invalidate  # type: ignore[attr-defined]
        call.refresh = self.refresh  # type: ignore[attr-defined]
        call.key = self.key  # type: ignore[attr-defined]
        call.cache = self._cache  # type: ignore[attr-defined]
        return call

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __set_name__(self, owner: type, name: str) -> None:
        # Only reached when we are the class attribute ourselves (classmethod and staticmethod
        # objects do not forward __set_name__), e.g. ``m = tiered(cache)(some_function)``.
        if owner.__dict__.get(name) is self and self._binding != "class":
            self._bind("method" if _first_param(self._fn) == "self" else "function")

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if self._binding == "class":
            return _Bound(self, owner if owner is not None else type(instance))
        if instance is not None and instance is owner:
            # classmethod(tiered(f)) on Python < 3.13 binds through us with (cls, cls).
            return _Bound(self, owner)
        if instance is None or self._binding != "method":
            return self
        return _Bound(self, instance)

    def __repr__(self) -> str:
        return f"<tiered {self._policy.name}>"


class _SyncTiered(_Tiered):
    """The implementation behind a sync TieredFunction."""

    def _make_call(self) -> Callable[..., Any]:
        hit = hit_path(self._keyfn, self._core, self._scope)
        miss = self._miss

        def call(*args: Any, **kwargs: Any) -> Any:
            value = hit(args, kwargs)
            return miss(value, args, kwargs) if type(value) is NeedLoad else value

        return call

    def _miss(self, need: NeedLoad, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flow = self._miss_flow(need)
        return self._engine.run(flow, functools.partial(self._fn, *args, **kwargs))

    def invalidate(self, *args: Any, **kwargs: Any) -> WriteResult:
        return self._engine.run(self._invalidate_flow(args, kwargs))

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        flow = self._refresh_flow(args, kwargs)
        return self._engine.run(flow, functools.partial(self._fn, *args, **kwargs))


class _AsyncTiered(_Tiered):
    """The implementation behind an AsyncTieredFunction."""

    def _make_call(self) -> Callable[..., Any]:
        hit = hit_path(self._keyfn, self._core, self._scope)
        miss = self._miss

        async def call(*args: Any, **kwargs: Any) -> Any:
            value = hit(args, kwargs)  # the L1 hit: no I/O, no generator, no await
            return await miss(value, args, kwargs) if type(value) is NeedLoad else value

        return call

    async def _miss(self, need: NeedLoad, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flow = self._miss_flow(need)
        return await self._engine.arun(flow, functools.partial(self._fn, *args, **kwargs))

    async def invalidate(self, *args: Any, **kwargs: Any) -> WriteResult:
        return await self._engine.arun(self._invalidate_flow(args, kwargs))

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        flow = self._refresh_flow(args, kwargs)
        return await self._engine.arun(flow, functools.partial(self._fn, *args, **kwargs))

    async def akey(self, *args: Any, **kwargs: Any) -> str:
        """``key``, with the versions of a scoped call read on the event loop (never blocking it)."""
        if self._scope is None:
            return self._keyfn(args, kwargs)
        return self._or_known(await self._engine.arun(self._scoped(args, kwargs)), args, kwargs)

    def _as_function(self) -> Callable[..., Any]:
        call = super()._as_function()
        call.akey = self.akey  # type: ignore[attr-defined]
        return call


class _Bound:
    """A decorated method bound to an instance: every helper gets the instance first."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: _Tiered, instance: Any) -> None:
        self.__func__ = func
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.refresh(self.__self__, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> str:
        return self.__func__.key(self.__self__, *args, **kwargs)

    def akey(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, str]:
        func = self.__func__
        if not isinstance(func, _AsyncTiered):
            raise AttributeError(f"{func!r} is a sync function: use .key(...)")
        return func.akey(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)


class _Decorator:
    __slots__ = ("_cache", "_key", "_name", "_options")

    def __init__(
        self, cache: TieredCache, key: Callable[..., Any] | None, name: str | None, options: dict[str, Any]
    ) -> None:
        self._cache, self._key, self._name, self._options = cache, key, name, options

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncTieredFunction[P, R]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, fn: Callable[P, R]) -> TieredFunction[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Any:
        impl: type[_Tiered]
        binding = None
        if isinstance(fn, (staticmethod, classmethod)):
            # @tiered above @staticmethod/@classmethod: we do the binding ourselves, so the
            # helpers (.invalidate, .key, ...) get ``cls`` too, on every Python version.
            binding = "class" if isinstance(fn, classmethod) else "function"
            fn = fn.__func__
        _validate.decorated("@tiered", fn)
        impl = _AsyncTiered if inspect.iscoroutinefunction(fn) else _SyncTiered
        result = impl(fn, self._cache, self._key, self._name, dict(self._options))
        if binding is not None:
            result._bind(binding)
        if result._binding in {"method", "class"}:
            return result  # a descriptor: binds the instance (or class) into the helpers too
        if binding == "function":  # @tiered above @staticmethod: keep it unbound in the class
            return staticmethod(result._as_function())
        return result._as_function()


def tiered(
    cache: TieredCache,
    *,
    ttl: float | None = None,
    l1_ttl: float | None = None,
    key: Callable[..., Any] | None = None,
    name: str | None = None,
    stale_ttl: float = 0.0,
    soft_timeout: float | None = None,
    hard_timeout: float | None = None,
    refresh_beta: float = 0.0,
    refresh_after: float | None = None,
    ttl_jitter: float = 0.0,
    cache_errors: tuple[type[BaseException], ...] = (),
    error_ttl: float = 5.0,
    tags: Sequence[str] | Callable[..., Iterable[str] | str] | None = None,
    tenant: Callable[..., str | None] | None = None,
) -> _Decorator:
    """Cache a function's results in ``cache``'s L1 and Redis.

    Concurrent misses of one key call the function once per process, and, through a lease
    in Redis, once across processes: the others wait for that result (docs/stampede.md).

    Args:
        cache: the :class:`TieredCache` to use.
        ttl: seconds in Redis for this function's entries (default: the cache's ``ttl``).
        l1_ttl: at most this many seconds in L1 (default: the cache's ``l1_ttl``).
        key: a function with the decorated function's signature returning the key: a str
            is used as a user key (the same one ``cache.get``/``cache.set`` take), anything
            else is encoded canonically and digested.
        name: replaces ``module.qualname`` in the key, so keys survive moving the function.
        stale_ttl: seconds an entry is kept in this process's L1 past its TTL, to answer
            with if the function raises or outlasts a timeout (fail-safe). Never served
            while the function succeeds in time, nor after an invalidation of the entry.
        soft_timeout: seconds after which a caller that has a stale value answers with it,
            while the load goes on in the background and stores its result.
        hard_timeout: seconds after which callers stop waiting: the stale value if there is
            one, else :class:`LoadTimeoutError`. The lease is given back; an async load is
            cancelled, a sync one runs on in its worker thread (Python cannot stop a thread)
            and its late result is dropped.
        refresh_beta: XFetch's beta (1.0 is the paper's default; larger refreshes earlier):
            a hot entry is recomputed in the background, by one caller in one process,
            before it expires, while callers keep getting the current value. 0: off.
        refresh_after: seconds after a fill from which a call refreshes the entry in the
            background (a soft TTL; must be below ``ttl``).
        ttl_jitter: up to this fraction of ``ttl`` is taken off each fill's TTL at random
            (0.1: 90-100 % of ttl), so entries filled together do not expire together.
        cache_errors: exception types whose raising is remembered in this process's L1
            for ``error_ttl`` seconds (negative caching): calls raise it again without
            calling the function. Other exceptions are never cached.
        error_ttl: seconds a cached exception is kept (only with ``cache_errors``).
        tags: names (or a function of the call's arguments returning names) whose
            ``cache.invalidate_tags(...)`` invalidates this call's entry, in O(1): the key
            includes each tag's version (docs/tags-and-tenants.md).
        tenant: a function of the call's arguments returning its tenant (or None); default:
            the cache's current ``cache.tenant(...)`` scope, if the cache has ``tenants=True``.
            Entries of different tenants never share a key.

    With ``soft_timeout`` or ``hard_timeout`` a miss's load runs on a worker thread (sync)
    or as a task (async), in a copy of the caller's context variables.

    Returns:
        A decorator turning a function into a :class:`TieredFunction` or, for ``async def``,
        an :class:`AsyncTieredFunction`.
    """
    _validate.instance("tiered(cache=...)", cache, TieredCache)
    _validate.seconds(ttl=ttl, soft_timeout=soft_timeout, hard_timeout=hard_timeout, optional=True)
    _validate.seconds(refresh_after=refresh_after, optional=True)
    _validate.seconds(l1_ttl=l1_ttl, zero=True, optional=True)
    _validate.seconds(stale_ttl=stale_ttl, zero=True)
    _validate.non_negative(refresh_beta=refresh_beta)
    _validate.seconds(error_ttl=error_ttl)
    _validate.less_than("soft_timeout", soft_timeout, "hard_timeout", hard_timeout)
    _validate.fraction(ttl_jitter=ttl_jitter)
    _validate.exception_types(cache_errors=cache_errors)
    _validate.function("with the decorated function's signature", key=key)
    _validate.names(tags=tags)
    _validate.function("of the call's arguments returning the tenant", tenant=tenant)
    options: dict[str, Any] = {
        "ttl": ttl,
        "l1_ttl": l1_ttl,
        "stale_ttl": stale_ttl,
        "soft_timeout": soft_timeout,
        "hard_timeout": hard_timeout,
        "refresh_beta": refresh_beta,
        "refresh_after": refresh_after,
        "ttl_jitter": ttl_jitter,
        "cache_errors": cache_errors,
        "error_ttl": error_ttl,
        "tags": tags if tags is None or callable(tags) else tuple(tags),
        "tenant": tenant,
    }
    return _Decorator(cache, key, name, options)


def _first_param(fn: Callable[..., Any]) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params[0] if params else None


def _custom_key(key: Callable[..., Any], space: KeySpace, prefix: str) -> KeyFn:
    def derive(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        k = key(*args, **kwargs)
        if isinstance(k, str):
            return space.user_key(k)
        return space.root + prefix + "{" + digest(canonical_bytes(k, "key()")) + "}"

    return derive
