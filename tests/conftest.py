"""Shared fixtures: real redis-server processes started per session or per test, namespaces,
the ``mode`` fixture that runs one scenario through the sync and the async driver, and the
stampede tests' clock, gate and count of joined callers. What they are built on lives in
``tests/support/``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support import Clock, FakeRedisCaches, Gate, Joined, L1Caches, MemoryCaches, Mode, RedisCaches, RedisServer
from tiercache._flight import Flight


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


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    m = Mode(request.param)
    yield m
    m.close()


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, mode: Mode, namespace: str) -> Iterator[FakeRedisCaches]:
    """The Redis a scenario written once runs on: tiercache.testing's in-memory Redis, fakeredis,
    or the session's real redis-server (in this test's namespace); or none ("l1", for a module
    that parametrizes ``backend`` with it). ``backend.cache(**kwargs)`` makes a subscribed
    cache, closed at teardown; ``backend.raw`` looks behind the caches (None without Redis)."""
    deployment: FakeRedisCaches
    if request.param == "memory":
        deployment = MemoryCaches(mode, namespace)
    elif request.param == "fakeredis":
        deployment = FakeRedisCaches(mode, namespace)
    elif request.param == "l1":
        deployment = L1Caches(mode, namespace)
    else:
        deployment = RedisCaches(mode, namespace, request.getfixturevalue("redis_server"))
    yield deployment
    deployment.close()


@pytest.fixture
def clock() -> Clock:
    """Real monotonic time plus an offset the test moves forward (``clock.advance``)."""
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
