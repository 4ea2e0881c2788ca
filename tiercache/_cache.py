"""TieredCache: configuration in code, the sync facade, and its async view ``cache.aio``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _async, _sync
from ._codec import Codec, MsgpackSerializer
from ._flow import Core
from ._keys import user_key, validate_namespace
from ._local import LocalCache
from ._metrics import CacheStats
from ._types import MISSING, Serializer
from .errors import ConfigError

__all__ = ["AsyncCacheView", "TieredCache"]

logger = logging.getLogger("tiercache")

# Connection settings an async pool can copy from a sync client's pool.
_PORTABLE = ("host", "port", "path", "db", "username", "password", "client_name", "protocol")


class TieredCache:
    """A per-process L1 in front of Redis (L2), shared by sync and async code.

    Args:
        url: Redis URL, e.g. ``"redis://127.0.0.1:6379/0"``. Omit it (and ``client``) for an
            L1-only cache.
        client: a ``redis.Redis`` to use instead of ``url`` (its connection pool is used).
        async_client: a ``redis.asyncio.Redis`` for async calls. Without it, async calls use
            a pool per event loop made from ``url`` or ``client``'s connection settings.
        namespace: prefix of every key and of the invalidation channel; caches that must see
            each other's entries use the same namespace.
        ttl: seconds an entry lives in Redis (default 300).
        l1_ttl: at most this many seconds in L1, never longer than the Redis copy has left.
        l1_maxsize: most entries L1 holds (least recently used are evicted).
        l1_maxbytes: most bytes of encoded values L1 holds, or None for no byte bound.
        serializer: how values become bytes; default :class:`MsgpackSerializer` (no code
            execution). :class:`PickleSerializer` requires ``signing_key``.
        signing_key: secret bytes; when set, every value is HMAC-SHA256 signed and unsigned
            or badly signed values read from Redis are misses.
        compression: ``"auto"`` (zstd if installed, else zlib), ``"zlib"``, ``"zstd"`` or None.
        compress_threshold: encoded values at least this many bytes are compressed.
        max_value_bytes: larger encoded values are returned but not cached (None: no limit).
        strict: raise :class:`~tiercache.BackendError` when Redis fails instead of failing open.
        socket_timeout: seconds a Redis command may take before the call fails open.
        connect_timeout: seconds to connect to Redis.
        pool_size: connections per pool (one pool per process, one per event loop for async).
        pool_timeout: seconds a caller waits for a free connection when all are busy.
        clock: monotonic clock in seconds (injected by tests).

    Example:
        >>> cache = TieredCache(namespace="docs")          # L1 only: no Redis configured
        >>> cache.set("greeting", "hello")
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
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        pool_size: int = 64,
        pool_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        validate_namespace(namespace)
        _positive("ttl", ttl)
        _positive("l1_ttl", l1_ttl, allow_zero=True)
        _positive("socket_timeout", socket_timeout)
        _positive("connect_timeout", connect_timeout)
        _positive("pool_timeout", pool_timeout, allow_zero=True)
        if not isinstance(l1_maxsize, int) or l1_maxsize < 0:
            raise ConfigError(f"l1_maxsize={l1_maxsize!r} must be an int >= 0 (0 turns L1 off)")
        if l1_maxbytes is not None and (not isinstance(l1_maxbytes, int) or l1_maxbytes <= 0):
            raise ConfigError(f"l1_maxbytes={l1_maxbytes!r} must be a positive int or None")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"pool_size={pool_size!r} must be an int >= 1")
        if url is not None and client is not None:
            raise ConfigError("pass either url or client=, not both")
        if serializer is None:
            serializer = MsgpackSerializer()
        elif not isinstance(serializer, Serializer):
            raise ConfigError(f"serializer={serializer!r} lacks ident/name/requires_signature/dumps/loads")
        self.namespace = namespace
        codec = Codec(
            serializer,
            signing_key=signing_key,
            compression=compression,
            compress_threshold=compress_threshold,
            max_value_bytes=max_value_bytes,
        )
        self._sync, self._async = _connect(
            url, client, async_client, socket_timeout, connect_timeout, pool_size, pool_timeout
        )
        has_remote = self._sync is not None
        if not has_remote:
            logger.info("tiercache: no Redis configured for namespace %r: L1 only", namespace)
        self._core = Core(
            namespace=namespace,
            ttl=ttl,
            l1_ttl=l1_ttl,
            local=LocalCache(l1_maxsize, l1_maxbytes, clock),
            codec=codec,
            has_remote=has_remote,
            strict=strict,
            clock=clock,
        )
        self.aio = AsyncCacheView(self)
        """The same cache with ``async`` methods: ``await cache.aio.get(key)``."""

    @property
    def serializer(self) -> Serializer:
        """The serializer in use (``cache.serializer.register(MyDataclass)`` where supported)."""
        return self._core.codec.serializer  # type: ignore[no-any-return]

    def key(self, key: str) -> str:
        """The Redis key that ``get``/``set``/``delete`` use for the user key ``key``."""
        return user_key(self.namespace, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (from L1, else Redis), or ``default``."""
        rkey = user_key(self.namespace, key)
        value = self._core.local.get(rkey)
        if value is not MISSING:
            self._core.counters.l1_hits += 1
            return value
        value = _sync.drive(self._core.read_through(rkey, None, None, False), self._sync, None)
        return default if value is MISSING else value

    def set(self, key: str, value: Any, *, ttl: float | None = None, l1_ttl: float | None = None) -> None:
        """Store ``value`` in Redis and L1 and tell every other process to drop its copy.

        Raises:
            CodecError: the serializer cannot encode ``value`` (or it is above max_value_bytes).
        """
        _positive("ttl", ttl, optional=True)
        _sync.drive(self._core.set(user_key(self.namespace, key), value, ttl, l1_ttl), self._sync, None)

    def delete(self, *keys: str) -> None:
        """Remove ``keys`` from Redis and L1, and from every other process's L1."""
        if keys:
            rkeys = [user_key(self.namespace, k) for k in keys]
            _sync.drive(self._core.delete(rkeys), self._sync, None)

    def stats(self) -> CacheStats:
        """Counters and sizes of this cache in this process."""
        return self._core.stats()

    def close(self) -> None:
        """Disconnect the sync pool. Async pools: use ``await cache.aclose()``."""
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Disconnect the pool of the running event loop and the sync pool."""
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


class AsyncCacheView:
    """``cache.aio``: the methods of :class:`TieredCache`, awaitable, on ``redis.asyncio``."""

    __slots__ = ("_cache",)

    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (from L1, else Redis), or ``default``."""
        c = self._cache
        rkey = user_key(c.namespace, key)
        value = c._core.local.get(rkey)
        if value is not MISSING:
            c._core.counters.l1_hits += 1
            return value
        value = await _async.drive(c._core.read_through(rkey, None, None, False), c._async, None)
        return default if value is MISSING else value

    async def set(self, key: str, value: Any, *, ttl: float | None = None, l1_ttl: float | None = None) -> None:
        """Store ``value`` in Redis and L1 and tell every other process to drop its copy."""
        _positive("ttl", ttl, optional=True)
        c = self._cache
        await _async.drive(c._core.set(user_key(c.namespace, key), value, ttl, l1_ttl), c._async, None)

    async def delete(self, *keys: str) -> None:
        """Remove ``keys`` from Redis and L1, and from every other process's L1."""
        c = self._cache
        if keys:
            await _async.drive(c._core.delete([user_key(c.namespace, k) for k in keys]), c._async, None)

    async def aclose(self) -> None:
        """Same as ``await cache.aclose()``."""
        await self._cache.aclose()


def _positive(name: str, value: float | None, *, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be a finite number of seconds {bound}")


def _connect(
    url: str | None,
    client: redis.Redis | None,
    async_client: redis.asyncio.Redis | None,
    socket_timeout: float,
    connect_timeout: float,
    pool_size: int,
    pool_timeout: float,
) -> tuple[_sync.SyncRedis | None, _async.AsyncRedis | None]:
    """The sync and async executors for the configured Redis (None, None: L1 only)."""
    common: dict[str, Any] = {
        "max_connections": pool_size,
        "timeout": pool_timeout,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    sync_pool: redis.ConnectionPool
    if url is not None:
        try:
            sync_pool = redis.BlockingConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **common)
        except ValueError as exc:
            raise ConfigError(f"url={url!r} is not a Redis URL: {exc}") from None
        async_url = url
    elif client is not None:
        if not isinstance(client, redis.Redis):
            raise ConfigError(f"client={client!r} must be a redis.Redis (Redis Cluster support is not built yet)")
        sync_pool = client.connection_pool
        async_url = None
    elif async_client is not None:
        raise ConfigError("async_client= needs url or client= too (sync calls need a client)")
    else:
        return None, None
    if sync_pool.connection_kwargs.get("decode_responses"):
        raise ConfigError("client= must be created with decode_responses=False: values are bytes")

    if async_client is not None:
        if async_client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("async_client= must be created with decode_responses=False")
        return _sync.SyncRedis(sync_pool), _async.AsyncRedis(pool=async_client.connection_pool)

    def make_async_pool() -> redis.asyncio.ConnectionPool:
        retry = AsyncRetry(NoBackoff(), 0)
        if async_url is not None:
            return redis.asyncio.BlockingConnectionPool.from_url(async_url, retry=retry, **common)
        kwargs = {k: v for k, v in sync_pool.connection_kwargs.items() if k in _PORTABLE}
        if "path" in kwargs:
            kwargs["connection_class"] = redis.asyncio.UnixDomainSocketConnection
        return redis.asyncio.BlockingConnectionPool(retry=retry, **common, **kwargs)

    return _sync.SyncRedis(sync_pool), _async.AsyncRedis(make_pool=make_async_pool)
