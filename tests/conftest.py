"""Shared fixtures: real redis-server processes started per session or per test, namespaces,
and the ``mode`` fixture that runs one scenario through the sync and the async driver."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis

from tests.stampede_support import Clock, Gate, Joined
from tiercache._flight import Flight

INSTALL_HINT = (
    "redis-server was not found on PATH. The integration tests start their own server: "
    "install it (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`) "
    "or set TIERCACHE_REDIS_SERVER=/path/to/redis-server."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process owned by the tests: started on a free loopback port, stopped by pid."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None) -> None:
        binary = os.environ.get("TIERCACHE_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra or []
        self.dir = tempfile.mkdtemp(prefix="tiercache-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err}")
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within 10 s")

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(port=self.port, **kwargs)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no goodbye to clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests isolate themselves by namespace."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone, which it may kill, pause or restart."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


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
            return self.loop.run_until_complete(result)  # type: ignore[arg-type]
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


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    m = Mode(request.param)
    yield m
    m.close()


class FakeRedisCaches:
    """One fakeredis server, a raw client on it, and caches made against it (coherent through
    its pub/sub), closed by ``close()``: the unit tests' stand-in for a Redis deployment."""

    def __init__(self, mode: Mode, namespace: str, **defaults: Any) -> None:
        self.mode = mode
        self.namespace = namespace
        self.defaults = defaults
        self.server = fakeredis.FakeServer()
        self.raw = fakeredis.FakeRedis(server=self.server)
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


# -- the stampede tests' fixtures (their helpers live in tests/stampede_support.py) --


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()


@pytest.fixture
def joined(monkeypatch: pytest.MonkeyPatch) -> Joined:
    j = Joined()
    original = Flight.add_waiter

    def add_waiter(self: Flight, callback: Callable[[], None]) -> bool:
        j.bump()
        return original(self, callback)

    monkeypatch.setattr(Flight, "add_waiter", add_waiter)
    return j
