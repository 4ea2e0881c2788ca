"""The ``mode`` a scenario runs in (the sync driver or the async one), and caches on fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis


class Mode:
    """Runs one scenario through the sync driver or the async driver, with the same code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name == "async"
        self.loop = asyncio.new_event_loop() if self.is_async else None

    def fn(self, body: Callable[..., Any]) -> Callable[..., Any]:
        """``body`` as a plain function (sync mode) or as an ``async def`` (async mode)."""
        if not self.is_async:
            return body

        async def async_body(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return body(*args, **kwargs)

        async_body.__name__ = async_body.__qualname__ = body.__name__
        async_body.__module__ = body.__module__
        return async_body

    def run(self, result: Any) -> Any:
        """The value of ``result``: awaited in async mode (on this test's loop)."""
        if isinstance(result, Awaitable):
            assert self.loop is not None
            return self.loop.run_until_complete(result)
        return result

    def api(self, cache: Any) -> Any:
        """``cache`` (sync) or ``cache.aio`` (async): the same method names either way."""
        return cache.aio if self.is_async else cache

    def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.run(f(*args, **kwargs))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


class FakeRedisCaches:
    """One fakeredis server, a raw client on it, and caches made against it (coherent through
    its pub/sub), closed by ``close()``: the unit tests' stand-in for a Redis deployment."""

    def __init__(self, mode: Mode, namespace: str, **defaults: Any) -> None:
        self.mode = mode
        self.namespace = namespace
        self.defaults = defaults
        self.server = fakeredis.FakeServer()
        self.raw: Any = fakeredis.FakeRedis(server=self.server)  # a redis client; None in L1Caches
        self.caches: list[Any] = []

    def cache(self, **kwargs: Any) -> Any:
        from tiercache import TieredCache

        cache = TieredCache(
            client=fakeredis.FakeRedis(server=self.server),
            async_client=fakeredis.FakeAsyncRedis(server=self.server),
            **{"namespace": self.namespace, **self.defaults, **kwargs},
        )
        self.caches.append(cache)
        assert cache.ready(5)  # L1 takes entries once the invalidation subscriber is subscribed
        return cache

    def close(self) -> None:
        for cache in self.caches:
            if self.mode.is_async:
                self.mode.run(cache.aclose())  # closes the async pool of the mode's loop too
            else:
                cache.close()


class RedisCaches(FakeRedisCaches):
    """:class:`FakeRedisCaches` on a real redis-server (the session's, in the test's namespace):
    the same ``raw``, ``cache(**kwargs)`` and ``close()``, so a scenario is written once for both
    (the ``backend`` fixture)."""

    def __init__(self, mode: Mode, namespace: str, server: Any, **defaults: Any) -> None:
        self.mode = mode
        self.namespace = namespace
        self.defaults = defaults
        self.url: str = server.url
        self.raw = server.client()
        self.caches = []

    def cache(self, **kwargs: Any) -> Any:
        from tiercache import TieredCache

        cache = TieredCache(self.url, **{"namespace": self.namespace, **self.defaults, **kwargs})
        self.caches.append(cache)
        assert cache.ready(10), "the cache's invalidation subscriber did not subscribe within 10 s"
        return cache

    def close(self) -> None:
        super().close()
        self.raw.close()


class L1Caches(FakeRedisCaches):
    """:class:`FakeRedisCaches` without Redis (``raw`` is None): caches that have only L1, for
    scenarios that run on every backend including none (``backend`` parametrized with "l1")."""

    def __init__(self, mode: Mode, namespace: str, **defaults: Any) -> None:
        self.mode = mode
        self.namespace = namespace
        self.defaults = defaults
        self.raw = None
        self.caches = []

    def cache(self, **kwargs: Any) -> Any:
        from tiercache import TieredCache

        cache = TieredCache(**{"namespace": self.namespace, **self.defaults, **kwargs})
        self.caches.append(cache)
        return cache


class MemoryCaches(FakeRedisCaches):
    """:class:`FakeRedisCaches` on ``tiercache.testing.MemoryRedis`` (the in-memory Redis users
    get for their own tests): ``raw`` is its fault-free client."""

    def __init__(self, mode: Mode, namespace: str, **defaults: Any) -> None:
        from tiercache.testing import MemoryRedis

        self.mode = mode
        self.namespace = namespace
        self.defaults = defaults
        self.memory = MemoryRedis()
        self.raw = self.memory.redis
        self.caches = []

    def cache(self, **kwargs: Any) -> Any:
        cache = self.memory.cache(**{"namespace": self.namespace, **self.defaults, **kwargs})
        self.caches.append(cache)
        return cache

    def close(self) -> None:
        if self.mode.is_async:
            self.mode.run(self.memory.aclose())  # the async pools of the mode's loop too
        else:
            self.memory.close()
