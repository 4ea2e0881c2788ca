"""Fixtures of the integration tests: raw clients to the test servers, caches closed for you.

Everything here talks to redis-server processes started by ``tests/conftest.py`` (the
session ``redis_server`` or a test's ``own_redis``), never to a Redis that was already running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.support import Mode, RedisServer, ready
from tiercache import TieredCache


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client (bytes replies) to the session server, to look behind the cache."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def own_raw(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client to this test's own server."""
    client = own_redis.client(socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def make_cache(mode: Mode, redis_server: RedisServer, namespace: str) -> Iterator[Callable[..., TieredCache]]:
    """``make_cache(url=None, **kwargs)``: a TieredCache on the session server (or ``url``) in
    this test's namespace, subscribed, and closed at teardown on the loop of ``mode`` (so its
    async pool too)."""
    made: list[TieredCache] = []

    def make(url: str | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("namespace", namespace)
        if "client" not in kwargs:
            url = url or redis_server.url
        cache = TieredCache(url, **kwargs)
        made.append(cache)
        return ready(cache)  # L1 takes entries only once the invalidation subscriber is subscribed

    yield make
    for cache in made:
        if mode.is_async:
            mode.run(cache.aclose())
        else:
            cache.close()
