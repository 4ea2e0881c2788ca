"""Connections: the sync and async executors a TieredCache runs its flows on, made from
``url``, ``client=`` or ``async_client=`` (see docs/architecture.md, Connections)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _async, _sync
from .errors import ConfigError

__all__ = ["block_slice", "connect", "database"]


def database(remote: _sync.SyncRedis | None) -> int:
    return int(remote.pool.connection_kwargs.get("db") or 0) if remote is not None else 0


def block_slice(remote: _sync.SyncRedis | None, socket_timeout: float) -> float:
    """How long one blocking command (BLPOP) may wait: well inside the connection's socket
    timeout, which is the client's own when ``client=`` was given."""
    own = remote.pool.connection_kwargs.get("socket_timeout") if remote is not None else None
    return min(0.1, (own or socket_timeout) / 2)


def connect(
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
    chosen = _sync_pool(url, client, async_client, common)
    if chosen is None:
        return None, None
    sync_pool, async_url = chosen
    if sync_pool.connection_kwargs.get("decode_responses"):
        raise ConfigError("client= must be created with decode_responses=False: values are bytes")

    if async_client is not None:
        if async_client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("async_client= must be created with decode_responses=False")
        return _sync.SyncRedis(sync_pool), _async.AsyncRedis(pool=async_client.connection_pool)

    if async_url is not None:

        def make_async_pool() -> redis.asyncio.ConnectionPool:
            return redis.asyncio.ConnectionPool.from_url(
                async_url,
                retry=AsyncRetry(NoBackoff(), 0),
                max_connections=pool_size,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
            )

        make: Callable[[], Any] | None = make_async_pool
    else:
        make = _async_twin(sync_pool, common)
    return _sync.SyncRedis(sync_pool), _async.AsyncRedis(make_pool=make, limit=pool_size, wait=pool_timeout)


def _sync_pool(
    url: str | None,
    client: redis.Redis | None,
    async_client: redis.asyncio.Redis | None,
    common: dict[str, Any],
) -> tuple[redis.ConnectionPool, str | None] | None:
    """The sync pool for ``url`` or ``client``, and the URL an async pool may be made from
    (None: copy the sync pool's settings); None when no Redis is configured."""
    if url is not None:
        try:
            pool = redis.BlockingConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **common)
        except ValueError as exc:
            raise ConfigError(f"url={url!r} is not a Redis URL: {exc}") from None
        return pool, url
    if client is not None:
        if not isinstance(client, redis.Redis):
            raise ConfigError(f"client={client!r} must be a redis.Redis (Redis Cluster support is not built yet)")
        return client.connection_pool, None
    if async_client is not None:
        raise ConfigError("async_client= needs url or client= too (sync calls need a client)")
    return None


def _async_twin(sync_pool: redis.ConnectionPool, common: dict[str, Any]) -> Callable[[], Any] | None:
    """A factory of async pools connecting where ``client=``'s pool connects, with the same
    settings (TLS included), or None for a connection class we do not know (e.g. fakeredis):
    async calls then raise ConfigError asking for ``async_client=`` rather than guessing."""
    twin = {
        redis.Connection: redis.asyncio.Connection,
        redis.SSLConnection: redis.asyncio.SSLConnection,
        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
    }.get(sync_pool.connection_class)
    if twin is None:
        return None
    accepted: set[str] = set()
    for klass in twin.__mro__:
        init = vars(klass).get("__init__")
        if init is not None and klass is not object:
            accepted |= set(inspect.signature(init).parameters)
    skip = {"retry", "self", "event_dispatcher", "redis_connect_func", "parser_class"}
    kwargs = {k: v for k, v in sync_pool.connection_kwargs.items() if k in accepted and k not in skip}
    kwargs.update({k: common[k] for k in ("socket_timeout", "socket_connect_timeout")})

    def make() -> redis.asyncio.ConnectionPool:
        return redis.asyncio.ConnectionPool(
            connection_class=twin,
            retry=AsyncRetry(NoBackoff(), 0),
            max_connections=common["max_connections"],
            **kwargs,
        )

    return make
