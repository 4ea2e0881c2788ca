"""TieredCache: configuration in code, the sync facade, and its async view ``cache.aio``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import redis
import redis.asyncio

from . import _connect, _subscriber, _validate
from ._codec import Codec, MsgpackSerializer
from ._coherence import WriteResult
from ._core import Core
from ._engine import Engine
from ._keys import validate_namespace, version_key
from ._local import LocalCache
from ._metrics import CacheStats
from ._types import MISSING, Serializer
from .errors import ConfigError

__all__ = ["AsyncCacheView", "TieredCache"]

logger = logging.getLogger("tiercache")


class TieredCache:
    """A per-process L1 in front of Redis (L2), shared by sync and async code, kept coherent
    across processes by an invalidation bus on Redis pub/sub.

    Args:
        url: Redis URL, e.g. ``"redis://127.0.0.1:6379/0"``. Omit it (and ``client``) for an
            L1-only cache.
        client: a ``redis.Redis`` to use instead of ``url`` (its connection pool is used).
        async_client: a ``redis.asyncio.Redis`` for async calls. Without it, async calls use
            a pool per event loop made from ``url`` or ``client``'s connection settings.
        namespace: prefix of every key and of the invalidation channel; caches that must see
            each other's entries and invalidations use the same namespace.
        ttl: seconds an entry lives in Redis (default 300).
        l1_ttl: at most this many seconds in L1, never longer than the Redis copy has left.
        l1_maxsize: most entries L1 holds (least recently used are evicted).
        l1_maxbytes: most bytes of values L1 holds, counted as their serialized size before
            compression, or None for no byte bound.
        serializer: how values become bytes; default :class:`MsgpackSerializer` (no code
            execution). :class:`PickleSerializer` requires ``signing_key``.
        signing_key: secret bytes; when set, every value is HMAC-SHA256 signed and unsigned
            or badly signed values read from Redis are misses.
        compression: ``"auto"`` (zstd if installed, else zlib), ``"zlib"``, ``"zstd"`` or None.
        compress_threshold: encoded values at least this many bytes are compressed.
        max_value_bytes: larger encoded values are returned but not cached (None: no limit).
        strict: raise :class:`~tiercache.BackendError` when Redis fails instead of failing open.
        coherent: run the invalidation subscriber (default). L1 is then served only while the
            subscriber is known to be subscribed. False: no subscriber, and another process's
            write reaches this process's L1 only when the entry's ``l1_ttl`` ends.
        staleness_bound: seconds. The subscriber pings when idle for half of this and gives
            up on a connection that stays silent for the other half, so after a message is
            lost to a dead or half-open connection, L1 is flushed within this bound.
        outage_l1_ttl: seconds an L1 entry filled during a Redis outage (the bus is down and
            Redis commands fail) is served, at most; default ``staleness_bound``. No other
            process can publish an invalidation while Redis is down, so this keeps the
            documented bound while the function runs about once per key per this many
            seconds per process, instead of on every call. L1 is flushed again when the bus
            is back. ``0``: L1 is off until the bus is back (every call during an outage runs
            the function). While the subscriber reconnects to a Redis that answers, L1 takes
            no entries whatever this says.
        ack_timeout: default seconds a ``wait=True`` write waits for acknowledgements.
        socket_timeout: seconds a Redis command may take before the call fails open.
        connect_timeout: seconds to connect to Redis.
        pool_size: connections per pool (one pool per process, one per event loop for async).
        pool_timeout: seconds a caller waits for a free connection when all are busy.
        lease_ttl: seconds a miss's lease lives in Redis. While one process loads a key,
            the others wait for its result, at most this long: a holder that dies costs
            that much, and a load slower than this is not stored. Keep it above your
            slowest function's usual time.
        coalesce_reads: async reads (L2 lookups) issued by different tasks in the same
            event-loop iteration go to Redis as one pipeline on one connection
            (DataLoader-style): fewer round trips and connections under high concurrency, one
            loop iteration of delay per read. On by default: measured here (bench_coalesce.py),
            2.4x the calls per second with 10 concurrent tasks and 5x with 100, at the same
            rate for a single task.
        tenants: keys depend on the current tenant, set with ``with cache.tenant("acme"):``
            (a context variable, so it follows threads' and tasks' contexts): entries of
            different tenants never share a key, and ``cache.invalidate_tenant("acme")``
            drops all of one tenant's entries in O(1). Calls outside any tenant share one
            scope of their own.
        breaker_threshold: consecutive Redis failures that open the circuit breaker (calls
            then skip Redis entirely).
        breaker_cooldown: seconds the breaker stays open before one call probes Redis.
        clock: monotonic clock in seconds (injected by tests).

    Example:
        >>> cache = TieredCache(namespace="docs")          # L1 only: no Redis configured
        >>> _ = cache.set("greeting", "hello")
        >>> cache.get("greeting")
        'hello'
        >>> cache.close()
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        namespace: str = "default",
        ttl: float = 300.0,
        l1_ttl: float = 60.0,
        l1_maxsize: int = 10_000,
        l1_maxbytes: int | None = None,
        serializer: Serializer | None = None,
        signing_key: bytes | None = None,
        compression: str | None = "auto",
        compress_threshold: int = 1024,
        max_value_bytes: int | None = 16 * 1024 * 1024,
        strict: bool = False,
        coherent: bool = True,
        staleness_bound: float = 1.0,
        outage_l1_ttl: float | None = None,
        ack_timeout: float = 2.0,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        pool_size: int = 64,
        pool_timeout: float = 1.0,
        lease_ttl: float = 10.0,
        tenants: bool = False,
        coalesce_reads: bool = True,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        validate_namespace(namespace)
        _validate.seconds(
            ttl=ttl, staleness_bound=staleness_bound, lease_ttl=lease_ttl, breaker_cooldown=breaker_cooldown
        )
        _validate.seconds(socket_timeout=socket_timeout, connect_timeout=connect_timeout)
        _validate.seconds(l1_ttl=l1_ttl, ack_timeout=ack_timeout, pool_timeout=pool_timeout, zero=True)
        _validate.seconds(outage_l1_ttl=outage_l1_ttl, zero=True, optional=True)
        _validate.count(breaker_threshold=breaker_threshold, pool_size=pool_size, minimum=1)
        _validate.count(l1_maxsize=l1_maxsize, minimum=0, hint=" (0 turns L1 off)")
        _validate.count(l1_maxbytes=l1_maxbytes, minimum=1, optional=True)
        _validate.not_both(url=url, client=client)
        _validate.serializer(serializer)
        self.namespace = namespace
        self._ack_timeout = ack_timeout
        self._staleness_bound = staleness_bound
        self._tenant_var = _tenant_var(namespace) if tenants else None
        codec = _codec(serializer, signing_key, compression, compress_threshold, max_value_bytes)
        self._sync, self._async = _connect.connect(
            url, client, async_client, socket_timeout, connect_timeout, pool_size, pool_timeout
        )
        if self._async is not None:
            self._async.coalesce = coalesce_reads
        if self._sync is None:
            logger.info("tiercache: no Redis configured for namespace %r: L1 only", namespace)
        self._core = Core(
            namespace=namespace,
            ttl=ttl,
            l1_ttl=l1_ttl,
            local=LocalCache(l1_maxsize, l1_maxbytes, clock),
            codec=codec,
            has_remote=self._sync is not None,
            coherent=coherent,
            strict=strict,
            clock=clock,
            block_slice=_connect.block_slice(self._sync, socket_timeout),
            db=_connect.database(self._sync),
            lease_ttl=lease_ttl,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
        )
        self._core.local.outage_ttl = staleness_bound if outage_l1_ttl is None else outage_l1_ttl
        self._engine = Engine(self._core, self._sync, self._async, self._tenant_var)
        self._closed = False
        self._subscriber: _subscriber.Subscriber | None = None
        self._start_subscriber()
        _track_for_fork(self)
        self.aio = AsyncCacheView(self)
        """The same cache with ``async`` methods: ``await cache.aio.get(key)``."""

    @property
    def serializer(self) -> Serializer:
        """The serializer in use (``cache.serializer.register(MyDataclass)`` where supported)."""
        serializer: Serializer = self._core.codec.serializer
        return serializer

    def key(self, key: str) -> str:
        """The Redis key that ``get``/``set``/``delete`` use for the user key ``key``."""
        return self._core.keyspace.user_key(key)

    def ready(self, timeout: float = 5.0) -> bool:
        """Wait until L1 may be served: the invalidation subscriber is subscribed.

        True at once for an L1-only or ``coherent=False`` cache. Until this is true, calls
        are still answered (from Redis or the function; if Redis is down, L1 keeps their
        results for at most ``outage_l1_ttl``).

        Raises:
            ConfigError: the Redis user may not PUBLISH on the invalidation channel (its writes
                would reach Redis but no other process); the message says what to grant.
        """
        bus = self._core.bus
        if bus is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            ready = bus.connected.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if bus.denied is not None:
                raise ConfigError(bus.denied)
            if ready or time.monotonic() >= deadline:
                return ready

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (from L1, else Redis), or ``default``."""
        value = self._engine.run(self._engine.get(key))
        return default if value is MISSING else value

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        l1_ttl: float | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> WriteResult:
        """Store ``value`` in Redis and L1 and tell every other process to drop its copy.

        ``wait=True``: return only once every subscribed process has acknowledged dropping its
        copy, or ``timeout`` (default ``ack_timeout``) passed; the result says how many did.

        Raises:
            CodecError: the serializer cannot encode ``value`` (or it is above max_value_bytes).
        """
        _validate.seconds(ttl=ttl, optional=True)
        return self._engine.run(self._engine.set(key, value, ttl, l1_ttl, self._wait(wait, timeout)))

    def delete(self, *keys: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Remove ``keys`` from Redis and L1, and from every other process's L1 (see ``set`` for ``wait``)."""
        return self._engine.run(self._engine.delete(keys, self._wait(wait, timeout)))

    def invalidate_tags(self, *tags: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Invalidate every entry of every function decorated with any of ``tags``, in every
        process, in O(1): each tag's version is bumped, so those entries are never read again
        (they expire by their TTL). See ``set`` for ``wait``.

        Example:
            ``@tiered(cache, tags=lambda user_id: [f"user:{user_id}"])`` on every function
            about a user; ``cache.invalidate_tags("user:42")`` after user 42 changed.
        """
        return self._engine.run(self._engine.bump("tag", tags, self._wait(wait, timeout)))

    def clear(self, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Drop every entry of this namespace (decorated functions, ``cache.set`` keys, every
        tenant), in Redis and in every process's L1, in O(1): the namespace moves to a new
        generation, so every key changes, and the old entries expire by their TTL. See
        ``set`` for ``wait``. (A ``coherent=False`` process has no subscriber, so it never reads
        the generation: it keeps the one it started with, and after a ``clear()`` elsewhere its
        keys are no longer the others'. Restart such processes after a clear.)"""
        return self._engine.run(self._engine.clear(self._wait(wait, timeout)))

    def invalidate_tenant(self, tenant: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Invalidate every entry of ``tenant`` (decorated calls and ``cache.get/set`` keys made
        in its scope), in every process, in O(1)."""
        return self._engine.run(self._engine.bump("tenant", (tenant,), self._wait(wait, timeout)))

    @contextlib.contextmanager
    def tenant(self, tenant: str) -> Iterator[None]:
        """Within this block (and the threads' or tasks' contexts copied from it), every key
        of this cache is the tenant's own. Needs ``TieredCache(tenants=True)``.

        Example:
            ``with cache.tenant(request.org_id): return render(report(day))``
        """
        if self._tenant_var is None:
            raise ConfigError("cache.tenant() needs TieredCache(..., tenants=True)")
        version_key(self.namespace, "tenant", tenant)  # a clear error for a bad name, here
        token = self._tenant_var.set(tenant)
        try:
            yield
        finally:
            self._tenant_var.reset(token)

    def invalidate(self, *redis_keys: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Remove entries by their Redis keys (``f.key(...)`` of a decorated function) from Redis
        and from the L1 of every process; see ``set`` for ``wait``.

        Example:
            ``cache.invalidate(get_user.key(42), wait=True)`` returns once every process has
            dropped its copy of ``get_user(42)``.
        """
        return self._engine.run(self._engine.invalidate(redis_keys, self._wait(wait, timeout)))

    def stats(self) -> CacheStats:
        """Counters and sizes of this cache in this process."""
        return self._core.stats()

    def _start_subscriber(self) -> None:
        if self._core.bus is not None and self._sync is not None:
            half = self._staleness_bound / 2
            self._subscriber = _subscriber.Subscriber(
                self._sync, self._core.bus, self._core.seq_key, half, half, self._core.log
            )
            self._subscriber.start()
            self._core.poll = self._subscriber.poll

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the parent's threads: no subscriber, and locks that may
        have been held at the fork. Start clean: L1 off and empty until the child's own
        subscriber confirms a subscription (invariant 4), then served again."""
        self._core.reset_after_fork()
        if self._async is not None:
            self._async.forget_pools()  # the parent's event loops do not run here
        if not self._closed:
            self._start_subscriber()

    def close(self) -> None:
        """Stop the subscriber and disconnect the sync pool (``await cache.aclose()`` also
        disconnects the running event loop's pool). With a subscriber, L1 is not served after
        this (nothing would keep it coherent); an L1-only or ``coherent=False`` cache keeps
        serving its L1."""
        self._closed = True
        _LIVE.discard(self)
        if self._subscriber is not None:
            self._subscriber.stop()
        if self._sync is not None:
            self._sync.close()
        if self._async is not None:
            self._async.discard_closed()

    async def aclose(self) -> None:
        """Disconnect the pool of the running event loop, then ``close()``."""
        if self._async is not None:
            await self._async.aclose()
        self.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> TieredCache:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _wait(self, wait: bool, timeout: float | None) -> float | None:
        _validate.seconds(timeout=timeout, zero=True, optional=True)
        if not wait:
            return None
        return self._ack_timeout if timeout is None else timeout


class AsyncCacheView:
    """``cache.aio``: the methods of :class:`TieredCache`, awaitable, on ``redis.asyncio``."""

    __slots__ = ("_cache", "_engine")

    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache
        self._engine = cache._engine

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (from L1, else Redis), or ``default``."""
        value = await self._engine.arun(self._engine.get(key))
        return default if value is MISSING else value

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        l1_ttl: float | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> WriteResult:
        """Store ``value`` in Redis and L1 and tell every other process to drop its copy."""
        _validate.seconds(ttl=ttl, optional=True)
        flow = self._engine.set(key, value, ttl, l1_ttl, self._cache._wait(wait, timeout))
        return await self._engine.arun(flow)

    async def delete(self, *keys: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Remove ``keys`` from Redis and L1, and from every other process's L1."""
        return await self._engine.arun(self._engine.delete(keys, self._cache._wait(wait, timeout)))

    async def invalidate_tags(self, *tags: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """``cache.invalidate_tags`` without blocking the event loop."""
        return await self._engine.arun(self._engine.bump("tag", tags, self._cache._wait(wait, timeout)))

    async def clear(self, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """``cache.clear`` without blocking the event loop."""
        return await self._engine.arun(self._engine.clear(self._cache._wait(wait, timeout)))

    async def invalidate_tenant(self, tenant: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """``cache.invalidate_tenant`` without blocking the event loop."""
        return await self._engine.arun(self._engine.bump("tenant", (tenant,), self._cache._wait(wait, timeout)))

    async def invalidate(self, *redis_keys: str, wait: bool = False, timeout: float | None = None) -> WriteResult:
        """Remove entries by their Redis keys from Redis and from the L1 of every process."""
        flow = self._engine.invalidate(redis_keys, self._cache._wait(wait, timeout))
        return await self._engine.arun(flow)

    async def ready(self, timeout: float = 5.0) -> bool:
        """``cache.ready()`` without blocking the event loop."""
        bus = self._cache._core.bus
        if bus is None or (bus.connected.is_set() and bus.denied is None):
            return True
        return await asyncio.to_thread(self._cache.ready, timeout)

    async def aclose(self) -> None:
        """Same as ``await cache.aclose()``."""
        await self._cache.aclose()


def engine_of(cache: TieredCache) -> Engine:
    """The engine behind ``cache``: how decorated and batch functions reach its flows."""
    return cache._engine


_LIVE: weakref.WeakSet[TieredCache] = weakref.WeakSet()
_fork_hook_registered = False


def _after_fork() -> None:
    for cache in list(_LIVE):
        cache._after_fork_in_child()


def _track_for_fork(cache: TieredCache) -> None:
    """Registers the at-fork hook with the first cache, not at import (no import side effects)."""
    global _fork_hook_registered  # noqa: PLW0603 - one process-wide hook
    _LIVE.add(cache)
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)
        _fork_hook_registered = True


def _tenant_var(namespace: str) -> contextvars.ContextVar[str | None]:
    """The context variable ``cache.tenant(...)`` sets (``TieredCache(tenants=True)``)."""
    return contextvars.ContextVar(f"tiercache_tenant_{namespace}", default=None)


def _codec(
    serializer: Serializer | None,
    signing_key: bytes | None,
    compression: str | None,
    compress_threshold: int,
    max_value_bytes: int | None,
) -> Codec:
    """The codec of a cache's values; msgpack unless ``serializer`` says otherwise."""
    return Codec(
        MsgpackSerializer() if serializer is None else serializer,
        signing_key=signing_key,
        compression=compression,
        compress_threshold=compress_threshold,
        max_value_bytes=max_value_bytes,
    )
