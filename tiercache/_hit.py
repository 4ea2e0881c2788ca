"""The L1 hit path of decorated functions (no generator, no I/O, no await: the hot path),
and what it needs: a function's scope (tags, tenant) and the miss it hands on."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import _scope
from ._core import Core
from ._engine import Engine
from ._keys import KeyMaker, scope_name, scoped_key, version_key
from ._local import FRESH_UNTIL, VALUE

__all__ = ["KeyFn", "NeedLoad", "Scope", "hit_path"]

#: How a decorated function derives a key from its call's ``(args, kwargs)``.
KeyFn = Callable[[tuple[Any, ...], dict[str, Any]], str]


class NeedLoad:
    """What the hit path answers on a miss: the key it derived, so the miss path need not;
    with ``scope`` (tenant, version keys), the unscoped key, whose versions L1 lacks."""

    __slots__ = ("key", "scope")

    def __init__(self, key: str, scope: tuple[str | None, list[str]] | None = None) -> None:
        self.key = key
        self.scope = scope


class Scope:
    """A function's tags and tenant: which version counters its keys depend on (see
    ``_keys.scoped_key``). Tags are static names or a function of the call's arguments; the
    tenant comes from ``tenant=`` (a function of the arguments) or the cache's current
    ``cache.tenant(...)`` scope."""

    __slots__ = ("_namespace", "_static", "_tags_fn", "_tenant_fn", "_tenant_var")

    def __init__(self, engine: Engine, tags: Any, tenant: Callable[..., Any] | None) -> None:
        self._namespace = engine.namespace
        self._tags_fn: Callable[..., Any] | None = tags if callable(tags) else None
        self._static = [] if tags is None or callable(tags) else [version_key(engine.namespace, "tag", t) for t in tags]
        self._tenant_fn = tenant
        self._tenant_var = engine.tenant_var

    def resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, list[str]]:
        tenant_fn, var = self._tenant_fn, self._tenant_var
        tenant: Any = tenant_fn(*args, **kwargs) if tenant_fn is not None else var.get() if var is not None else None
        if tenant is not None and type(tenant) is not str:
            tenant = scope_name(tenant, "tenant")  # an int id as its decimal string, as version_key names it
        names = self._static
        if self._tags_fn is not None:
            tags = self._tags_fn(*args, **kwargs)
            if isinstance(tags, str):
                tags = (tags,)
            names = [version_key(self._namespace, "tag", t) for t in tags]
        if tenant is not None:
            names = [*names, version_key(self._namespace, "tenant", tenant)]
        return tenant, names


_POLL_EVERY = 256


def hit_path(keyfn: KeyFn, core: Core, scope: Scope | None) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    """The L1 lookup of one decorated function, shared by its sync and async wrappers: the
    key (single-argument calls from a per-type memo, without building a tuple), then the
    OrderedDict entry and its expiry, inlined from LocalCache.get (this is the hot path)."""
    if scope is not None:
        return _scoped_hit_path(keyfn, core, scope)
    single = keyfn.single if isinstance(keyfn, KeyMaker) else {}
    data_get, move_to_end, clock = core.local.hit_parts()
    counters = core.counters
    countdown = _POLL_EVERY

    def hit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        nonlocal countdown
        countdown -= 1
        if countdown <= 0:  # let invalidations that arrived in while we hold the GIL apply now
            countdown = _POLL_EVERY
            core.poll()
        if len(args) == 1 and not kwargs:
            memo = single.get(type(args[0]))
            key = memo.get(args[0]) if memo is not None else None
            if key is None:
                key = keyfn(args, kwargs)
        else:
            key = keyfn(args, kwargs)
        entry = data_get(key)
        if entry is None or entry[FRESH_UNTIL] <= clock():
            return NeedLoad(key)
        try:
            move_to_end(key)
        except KeyError:  # evicted by another thread since the get: still a hit
            pass
        counters.l1_hits += 1
        return entry[VALUE]

    return hit


def _scoped_hit_path(keyfn: KeyFn, core: Core, scope: Scope) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    """The hit path of a function with tags or a tenant: the unscoped key as in ``hit_path``,
    then the versions of its tags and tenant from L1 (a miss there sends the call to the slow
    path, which reads them from Redis), then the scoped key's entry."""
    resolve = scope.resolve
    cached_versions = functools.partial(_scope.cached_versions, core)
    data_get, move_to_end, clock = core.local.hit_parts()
    counters = core.counters
    countdown = _POLL_EVERY

    def hit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        nonlocal countdown
        countdown -= 1
        if countdown <= 0:
            countdown = _POLL_EVERY
            core.poll()
        base = keyfn(args, kwargs)
        tenant, names = resolve(args, kwargs)
        if not names:
            key = base
        else:
            versions = cached_versions(names)
            if versions is None:
                return NeedLoad(base, (tenant, names))
            key = scoped_key(base, tenant, versions)
        entry = data_get(key)
        if entry is None or entry[FRESH_UNTIL] <= clock():
            return NeedLoad(key)
        try:
            move_to_end(key)
        except KeyError:
            pass
        counters.l1_hits += 1
        return entry[VALUE]

    return hit
