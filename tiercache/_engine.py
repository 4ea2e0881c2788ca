"""The engine: the one way from the facades (``TieredCache``, ``cache.aio``, decorated and
batch functions) to the flows. It holds the cache's Core, its two executors and its tenant
scope, builds the facades' flows and runs them, so nothing above reaches into the cache."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import _async, _read, _scope, _sync, _write
from ._coherence import WriteResult
from ._core import Core
from ._steps import Flow
from ._types import MISSING
from .errors import KeyEncodingError

__all__ = ["Engine"]

R = TypeVar("R")


class Engine:
    """One cache's Core, its sync and async executors (None: L1 only) and its tenant scope."""

    __slots__ = ("aio", "core", "namespace", "sync", "tenant_var")

    def __init__(
        self,
        core: Core,
        sync: _sync.SyncRedis | None,
        aio: _async.AsyncRedis | None,
        tenant_var: contextvars.ContextVar[str | None] | None,
    ) -> None:
        self.core = core
        self.sync = sync
        self.aio = aio
        self.tenant_var = tenant_var
        self.namespace = core.namespace

    def run(self, flow: Flow[R], call: Callable[..., Any] | None = None) -> R:
        """Run ``flow`` on this thread (sync I/O); ``call`` is the user's function."""
        return _sync.drive(flow, self.sync, call)

    async def arun(self, flow: Flow[R], call: Callable[..., Any] | None = None) -> R:
        """Run ``flow`` on the running event loop (async I/O); ``call`` returns an awaitable."""
        return await _async.drive(flow, self.aio, call)

    # -- scope ------------------------------------------------------------------------------

    def tenant_scope(self) -> tuple[str | None, list[str]]:
        """The current tenant and the version key its scope depends on (none outside a tenant)."""
        tenant = None if self.tenant_var is None else self.tenant_var.get()
        return tenant, [] if tenant is None else [self.core.keyspace.version_key("tenant", tenant)]

    def version_keys(self, kind: str, names: Sequence[str]) -> list[str]:
        return [self.core.keyspace.version_key(kind, n) for n in names]

    def _user(self, key: str) -> tuple[str, str | None, list[str]]:
        return (self.core.keyspace.user_key(key), *self.tenant_scope())

    # -- the flows of TieredCache and cache.aio ------------------------------------------------

    def get(self, key: str) -> Flow[Any]:
        base, tenant, names = self._user(key)
        core = self.core
        if not names:
            return _read.get(core, base)
        return _scope.in_scope(core, base, tenant, names, lambda k: _read.get(core, k), MISSING)

    def set(
        self, key: str, value: Any, ttl: float | None, l1_ttl: float | None, wait: float | None
    ) -> Flow[WriteResult]:
        base, tenant, names = self._user(key)
        core = self.core
        if not names:
            return _write.store(core, base, value, ttl, l1_ttl, wait)
        return _scope.in_scope(
            core,
            base,
            tenant,
            names,
            lambda k: _write.store(core, k, value, ttl, l1_ttl, wait),
            WriteResult(None, None, None),
        )

    def delete(self, keys: Sequence[str], wait: float | None) -> Flow[WriteResult]:
        resolved = []
        for key in keys:
            base, tenant, names = self._user(key)
            scoped = yield from _scope.scope_key(self.core, base, tenant, names)
            if scoped is not None:
                resolved.append(scoped)
        return (yield from _write.delete(self.core, resolved, wait))

    def invalidate(self, redis_keys: Sequence[str], wait: float | None) -> Flow[WriteResult]:
        return _write.delete(self.core, self._own(redis_keys), wait)

    def bump(self, kind: str, names: Sequence[str], wait: float | None) -> Flow[WriteResult]:
        return _scope.bump(self.core, self.version_keys(kind, names), wait)

    def clear(self, wait: float | None) -> Flow[WriteResult]:
        return _scope.clear(self.core, wait)

    def _own(self, redis_keys: Sequence[str]) -> Sequence[str]:
        space = self.core.keyspace
        for k in redis_keys:
            if not isinstance(k, str) or not space.owns(k):
                raise KeyEncodingError(
                    f"invalidate({k!r}): not a key of namespace {self.namespace!r}; pass f.key(...) "
                    "of a decorated function or cache.key(user_key), or use cache.delete(user_key)"
                )
        return redis_keys
