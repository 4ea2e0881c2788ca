"""``@tiered_batch``: cache a function that computes many items in one call (embeddings,
vector lookups, bulk API requests) item by item.

The function takes a list of items as its first argument and returns one result per item,
in order. Each item has its own key (the item and the call's other arguments), so a later
call with a different batch, or a single item, finds what earlier batches stored. A call
looks every item up in L1, reads the rest from Redis in one pipelined round trip, and calls
the function once with only the items that missed both, then stores their results with one
script. Duplicates in the input are looked up and computed once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

from . import _batchread, _scope, _validate, _write
from ._cache import TieredCache, engine_of
from ._coherence import WriteResult
from ._keys import callable_name, canonical_bytes, claim_prefix, digest, function_prefix, scoped_key
from ._policy import Policy
from ._steps import CallWith, Flow
from .errors import BackendError, ConfigError

__all__ = ["BatchFunction", "tiered_batch"]

P = ParamSpec("P")
T = TypeVar("T")


class BatchFunction(Generic[P, T]):
    """What ``@tiered_batch`` makes of a function: call it like the function (``await`` it for
    an ``async def``); ``.keys(items, ...)`` (``await .akeys(items, ...)`` in async code) and
    ``.invalidate(items, ...)`` work per item.

    Example:
        >>> cache = TieredCache(namespace="docs-batch")
        >>> seen = []
        >>> @tiered_batch(cache)
        ... def lengths(words: list[str]) -> list[int]:
        ...     seen.append(list(words))
        ...     return [len(w) for w in words]
        >>> lengths(["a", "bb"]), lengths(["bb", "ccc", "a", "ccc"]), seen
        ([1, 2], [2, 3, 1, 3], [['a', 'bb'], ['ccc']])
    """

    def __init__(self, fn: Callable[..., Any], cache: TieredCache, policy: Policy, prefix: str) -> None:
        self._fn = fn
        self._cache = cache
        self._engine = engine_of(cache)
        self._core = self._engine.core
        self._policy = policy
        self._prefix = prefix
        try:
            self._signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"@tiered_batch cannot read the signature of {fn!r}: {exc}") from None
        params = list(self._signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ConfigError(f"@tiered_batch needs a function whose first parameter takes the items, got {fn!r}")
        self._items_param = params[0].name
        self._is_async = inspect.iscoroutinefunction(fn)
        self.cache = cache
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[str], list[str], list[Any], Any]:
        """(each item's key, the distinct keys, their items, how to call the function on a subset)."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._policy.name}() {exc}") from None
        bound.apply_defaults()
        items = bound.arguments[self._items_param]
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(
                f"{self._policy.name}(): {self._items_param}= must be a list of items, got {type(items).__name__}"
            )
        others = [(k, v) for k, v in bound.arguments.items() if k != self._items_param]
        context = canonical_bytes(others, "argument")
        root = self._core.keyspace.root
        keys = [
            root + self._prefix + "{" + digest(canonical_bytes(item, f"{self._items_param}[{i}]") + context) + "}"
            for i, item in enumerate(items)
        ]
        distinct: dict[str, Any] = {}
        for key, item in zip(keys, items, strict=True):
            distinct.setdefault(key, item)

        def call(subset: list[Any]) -> Any:
            bound.arguments[self._items_param] = subset
            return self._fn(*bound.args, **bound.kwargs)

        return keys, list(distinct), list(distinct.values()), call

    def _scoped_keys(self, distinct: list[str]) -> Flow[list[str] | None]:
        """The keys in the current tenant's scope (if any); None when its version cannot be read."""
        tenant, names = self._engine.tenant_scope()
        if not names:
            return distinct
        versions = yield from _scope.versions(self._core, names)
        return None if versions is None else [scoped_key(k, tenant, versions) for k in distinct]

    def _flow(self, distinct: list[str], items: list[Any]) -> Flow[dict[str, Any]]:
        scoped = yield from self._scoped_keys(distinct)
        if scoped is None:  # the tenant's scope cannot be read: compute, cache nothing
            values: Any = yield CallWith(items)
            return dict(zip(distinct, values, strict=True))
        found = yield from _batchread.read_batch(self._core, scoped, items, self._policy, self._policy.name)
        return {k: found[s] for k, s in zip(distinct, scoped, strict=True)}

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        keys, distinct, items, call = self._prepare(args, kwargs)
        flow = self._flow(distinct, items)
        if self._is_async:
            return self._acall(keys, flow, call)  # type: ignore[return-value]
        results = self._engine.run(flow, call)
        return [results[k] for k in keys]  # type: ignore[return-value]

    async def _acall(
        self, keys: list[str], flow: Flow[dict[str, Any]], call: Callable[[list[Any]], Awaitable[Any]]
    ) -> list[Any]:
        results = await self._engine.arun(flow, call)
        return [results[k] for k in keys]

    def keys(self, *args: P.args, **kwargs: P.kwargs) -> list[str]:
        """The Redis key of each item of this call (in the current tenant's scope, whose
        version may take a blocking round trip to read: in async code, ``await f.akeys(...)``)."""
        keys, distinct = self._prepare(args, kwargs)[:2]
        return _each(keys, distinct, self._engine.run(self._scoped_keys(distinct)))

    async def akeys(self, *args: P.args, **kwargs: P.kwargs) -> list[str]:
        """``keys``, with the tenant's version read on the event loop (never blocking it)."""
        keys, distinct = self._prepare(args, kwargs)[:2]
        return _each(keys, distinct, await self._engine.arun(self._scoped_keys(distinct)))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Drop these items' entries (in the current tenant's scope) from Redis and every
        process's L1; awaitable for an ``async def``. To wait for every process:
        ``cache.invalidate(*f.keys(items), wait=True)``."""
        flow = self._invalidate_flow(self._prepare(args, kwargs)[1])
        if self._is_async:
            return self._engine.arun(flow)
        return self._engine.run(flow)

    def _invalidate_flow(self, distinct: list[str]) -> Flow[WriteResult]:
        keys = yield from self._scoped_keys(distinct)
        return (yield from _write.delete(self._core, keys or [], None))

    def __repr__(self) -> str:
        return f"<tiered_batch {self._policy.name}>"


def _each(keys: list[str], distinct: list[str], scoped: list[str] | None) -> list[str]:
    """Each item's key in scope, from the distinct keys' (None: the tenant's version is unknown)."""
    if scoped is None:
        raise BackendError("the tenant's version cannot be read from Redis")
    mapping = dict(zip(distinct, scoped, strict=True))
    return [mapping[k] for k in keys]


def tiered_batch(
    cache: TieredCache,
    *,
    ttl: float | None = None,
    l1_ttl: float | None = None,
    name: str | None = None,
    ttl_jitter: float = 0.0,
) -> Callable[[Callable[P, T]], BatchFunction[P, T]]:
    """Cache a batch function item by item (see the module docstring).

    Args:
        cache: the :class:`TieredCache` to use.
        ttl: seconds in Redis for each item's entry (default: the cache's ``ttl``).
        l1_ttl: at most this many seconds in L1 (default: the cache's ``l1_ttl``).
        name: replaces ``module.qualname`` in the keys.
        ttl_jitter: up to this fraction of ``ttl`` is taken off each fill's TTL at random.
    """
    _validate.instance("tiered_batch(cache=...)", cache, TieredCache)
    _validate.seconds(ttl=ttl, optional=True)
    _validate.seconds(l1_ttl=l1_ttl, zero=True, optional=True)
    _validate.fraction(ttl_jitter=ttl_jitter)

    def decorate(fn: Callable[P, T]) -> BatchFunction[P, T]:
        _validate.decorated("@tiered_batch", fn)
        qualname = callable_name(fn)
        core = engine_of(cache).core
        policy = Policy(
            qualname,
            core.ttl if ttl is None else ttl,
            core.l1_ttl if l1_ttl is None else l1_ttl,
            ttl_jitter=ttl_jitter,
        )
        function_prefix(cache.namespace, name or qualname)  # validates the name
        batch: BatchFunction[P, T] = BatchFunction(fn, cache, policy, f"f:{name or qualname}:")
        if name is None:
            claim_prefix(core, qualname, fn)  # one live function per derived name
        return batch

    return decorate
